"""Dataset ingest: read an uploaded zip of images and captions safely, check it, report on it.

Modules: ``limits`` (caps and the rejection error), ``archive`` (bounded zip reading),
``images`` (content sniffing and decoding), ``layouts`` (caption sources in the layouts users
bring), ``preflight`` (the report), ``ingest`` (the atomic write of a dataset folder).
"""
