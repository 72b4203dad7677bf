"""The battle: a study of contestants x seeds trained under one recipe, judged on the paper's findings
and written up as a report (`spach battle`, `spach report`)."""
