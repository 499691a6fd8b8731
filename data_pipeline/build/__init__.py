"""The build wing: raw files → validated, deduplicated, split webdataset shards + manifest.json.

stages.py (the resumable stages and `build`), config.py (BuildConfig), readers/ (one module per
raw format), validate.py, dedup.py, split.py, shard_writer.py, cif_fast.py. It may import the
data_pipeline floor (record, shard_format, manifest) and crystalfm_common; nothing from load/.
"""
