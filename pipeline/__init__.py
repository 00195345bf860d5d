"""tagpipe: label image corpora with ONNX tagger models on Ray Data."""

__version__ = "0.1.0"
