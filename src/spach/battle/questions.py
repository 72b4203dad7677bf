"""The questions a study can ask: the paper's five findings (DESIGN.md section 1) and its size ordering."""

FINDINGS = {
    1: ("multi-stage", "Multi-stage layouts beat single-stage ones at equal cost"),
    2: ("local-modeling", "Local modeling (the CPE depthwise-conv bypass) lifts attention and MLP models"),
    3: ("mlp-overfit", "MLP over-fits as it grows; multi-stage layouts and weight sharing relieve it"),
    4: ("conv-vs-attn", "Convolution generalises better, attention has more capacity: they are complementary"),
    5: ("hybrid", "Hybrids (conv early, attention late) beat each pure family"),
    6: ("size-crossover", "As models grow, the best family goes MLP -> conv -> attention"),
    7: ("beyond", "A parameter-free (shift, pool, identity) or sparse (smlp) mixer matches the three families at equal cost"),
    8: ("modern", "The mixers of 2021-2025 (window attention, large-kernel conv, gMLP gating, focal modulation, gated "
                  "convolution, selective scan) beat SPACH's conv, attention and MLP at equal cost"),
    9: ("gate", "The gate, not the scan, does the work (MambaOut): the gated CNN beats plain conv and matches or beats "
                "the selective scan at equal cost"),
    10: ("large-kernel", "A larger kernel closes the gap: a 7x7 depthwise conv beats the 3x3 conv family and attention "
                         "at equal cost"),
}
QUESTION_KEYS = {key: n for n, (key, _) in FINDINGS.items()}
PAPER_FINDINGS = (1, 2, 3, 4, 5)  # the five findings; questions 6 and 7 are asked only when a study names them
BEYOND = ("shift", "smlp", "pool", "identity")  # the mixers beyond the paper (DESIGN.md 2b)
MODERN = ("window", "dwconv", "gmlp", "focal", "gatedconv", "scan")  # the mixers of 2021-2025 (DESIGN.md 2c), numbers aside

NEEDS = {
    1: "a single-stage and a multi-stage contestant of the same family (e.g. conv-ss and conv-ms)",
    2: "an attn or mlp contestant and the same architecture with cpe = false",
    3: "mlp contestants at two sizes, single- and multi-stage, and with shared_spatial_func = true, with "
       "eval_train_subset > 0 in the recipe so the generalisation gap is measured",
    4: "a conv and an attn contestant of the same layout, with eval_train_subset > 0 (their training curves)",
    5: "a hybrid contestant and pure conv, attn and mlp contestants of the same layout",
    6: "conv, attn and mlp multi-stage contestants at the same number (>= 2) of sizes",
    7: "a shift, smlp, pool or identity contestant and conv, attn and mlp contestants of its layout",
    8: "a window, dwconv, gmlp, focal, gatedconv or scan contestant and conv, attn and mlp contestants of its layout",
    9: "gatedconv, scan and conv contestants of one layout",
    10: "a dwconv contestant (e.g. dwconv7) and conv and attn contestants of its layout",
}
