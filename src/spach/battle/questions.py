"""The paper's five findings (DESIGN.md section 1) as questions a study can ask, by number and key."""

FINDINGS = {
    1: ("multi-stage", "Multi-stage layouts beat single-stage ones at equal cost"),
    2: ("local-modeling", "Local modeling (the CPE depthwise-conv bypass) lifts attention and MLP models"),
    3: ("mlp-overfit", "MLP over-fits as it grows; multi-stage layouts and weight sharing relieve it"),
    4: ("conv-vs-attn", "Convolution generalises better, attention has more capacity: they are complementary"),
    5: ("hybrid", "Hybrids (conv early, attention late) beat each pure family"),
}
QUESTION_KEYS = {key: n for n, (key, _) in FINDINGS.items()}

NEEDS = {
    1: "a single-stage and a multi-stage contestant of the same family (e.g. conv-ss and conv-ms)",
    2: "an attn or mlp contestant and the same architecture with cpe = false",
    3: "an mlp contestant and a conv or attn contestant of the same layout, with eval_train_subset > 0 in "
       "the recipe so the generalisation gap is measured",
    4: "a conv and an attn contestant of the same layout",
    5: "a hybrid contestant and pure conv, attn and mlp contestants of the same layout",
}
