"""Bytes and files, local or in object storage, through fsspec.

filesystem: one filesystem per protocol and options, retries of transient errors, atomic
and exclusive writes, bounded reads, plain Parquet reads. manifest: listing the inputs
(prefixes, files, manifests) into the manifest table, counting what it skips; key_ranges
lists a prefix of millions of keys in parallel by key ranges, and inventory reads an S3
Inventory report as the listing, with no LIST calls. outputs: the mark on every output
tagpipe writes, which listings leave out. writable: whether a command can write where it
was told, asked before any work. probe: whether this process can read one object of each
input and create and delete a probe object under the output (the tag job's preflight).
simulated: an object store of N virtual objects with a
set latency per page, for listing and planning at 10M objects. This layer knows nothing
about tag tables; reading "any input" (a file, a folder or a tag table) is the table
layer's.
"""
