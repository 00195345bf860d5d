"""One image, from bytes to model input: CPU work, no model and no Ray.

imaging opens and checks an image (bomb limits, chunk CRCs, truncation), decodes it under
a time and memory budget, makes it upright and RGB, and applies the profile's geometry;
phash hashes it and marks its fragile bits; decode is the stage (a plain callable over a
batch of manifest rows) that Ray Data maps over CPU tasks.
"""
