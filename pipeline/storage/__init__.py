"""Bytes and files, local or in object storage, through fsspec.

filesystem: one filesystem per protocol and options, retries of transient errors, atomic
and exclusive writes, bounded reads, plain Parquet reads. manifest: listing the inputs
(prefixes, files, manifests) into the manifest table, counting what it skips. outputs: the
mark on every output tagpipe writes, which listings leave out. This layer
knows nothing about tag tables; reading "any input" (a file, a folder or a tag table) is
the table layer's.
"""
