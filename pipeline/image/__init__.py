"""One image, from bytes to model input: CPU work, no model and no Ray.

imaging opens and checks an image (bomb limits, chunk CRCs, truncation), decodes it under
a time and memory budget, makes it upright and RGB, and applies the profile's geometry;
phash hashes it and marks its fragile bits; decode is the stage (a plain callable over a
batch of manifest rows, or of bytes in memory) that Ray Data maps over CPU tasks; edits
are the standard edits (crops, flip, JPEG q30, ...) that tag-time calibration applies.
"""
