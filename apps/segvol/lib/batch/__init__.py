"""Batch work over a whole datastore: pre-annotation of an archive with Ray."""
