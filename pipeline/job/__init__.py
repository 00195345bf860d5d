"""The jobs users run, and the one module that builds the Ray graph.

settings: the typed settings of the tag and nightly jobs. incremental: what to tag, reuse,
drop and rewrite against the table's current version. graph: the Ray Data graph (decode
tasks, one tagger actor pool per model of the pass) and where resources go; the stage it
places is pipeline/model/tagger.py. slices: rows routed into the slice that becomes one
part. model_runs: each model's table in a run, and the one tagging pass of them all.
tag_job: plan, execute, commit. edit_calibration: after a new inference key's first commit,
how far the embedding moves under standard edits. rethreshold: new rules over stored logits. nightly: tag,
dedup, split and audit in one run.
"""
