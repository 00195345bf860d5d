"""The jobs users run, and the one module that builds the Ray graph.

settings: the typed settings of the tag and nightly jobs. preflight: what `tag` checks
before any work (inputs there, output writable; then the storage preflight, in the
driver and in one Ray task per node). changes: which listed images are new,
changed, unchanged or deleted against the table's version. incremental: the run's keys
and what to tag, reuse, drop and rewrite. setting_changes: what a run changes by name,
and what the stored logits serve without the model. plan: what a run must do, decided
before any work. graph: the Ray Data graph (decode tasks, one tagger actor pool per model
of the pass; or fused: one pool that decodes and tags) and where resources go; the stage
it places is pipeline/model/tagger.py. busy: how much of the tagging's wall time the
model sessions and decode worked, collected from the rows.
slices: rows coming back from Ray, routed into their slice, one part each. model_runs:
each model's table in a run (frozen records, one per step), and the one tagging pass of
them all. tag_job: plan, execute, commit. run_summary: what a run did, in numbers.
label_check: source (human) tags checked against the model over a version's parts.
edit_calibration: after a new inference key's first commit, how far the embedding moves
under standard edits. rethreshold: new rules over stored logits. nightly: tag, dedup,
split and audit in one run.
"""
