"""Command-line tools around the pipeline (`python -m instructrl.tools.<name>`).

plan       per-device memory of every stage's compiled program, against a chip's HBM
sweep      ablation sweeps: shared stages, per-member commands, aggregate table and plot
best_of_n  the RM's best-of-n curve against the gold judge
rm_cv      RM cross-validation over held-out labeler groups (the paper's 5-fold)
convert    HF checkpoint <-> stage checkpoint (import / export)
prepare_tfds  a public dataset written as a TFDS array_record copy
"""
