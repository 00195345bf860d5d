"""The embedded demo: a small real ONNX tagger and a synthetic corpus with planted truth.

synthetic renders the images (kinds, planted copies), model builds the demo model and its
bundle, end_to_end runs tag, dedup, split and audit on them and checks the result.
planted_table writes tag tables with planted near-duplicates at any size (for the corpus
stages' tests and benchmarks, with no tagging), and label_noise plants label noise in
source tags and measures how much of it the label check finds. Only the CLI imports this
layer; tests use it as a fixture.
"""
