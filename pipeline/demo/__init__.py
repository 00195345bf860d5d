"""The embedded demo: a small real ONNX tagger and a synthetic corpus with planted truth.

synthetic renders the images (kinds, planted copies), model builds the demo model and its
bundle, end_to_end runs tag, dedup, split and audit on them and checks the result. Only
the CLI imports this layer; tests use it as a fixture.
"""
