"""Everything about a model, before any image is seen.

A model folder becomes a ModelBundle (bundle): its preprocessing profile (profiles, TOML
files in profiles/, imported from timm or Hugging Face configs by profile_import, with the
resize/crop arithmetic of each reference in geometry), vocabulary, calibration and OOD
reference. The ONNX graph is inspected and edited in onnx_tools, run in runtime's sessions,
and its outputs turned into tags by postprocess under the rules (which scores become
tags, shared by tag and rethreshold). describe prints what a folder holds;
hub pulls one from the Hugging Face Hub.
"""
