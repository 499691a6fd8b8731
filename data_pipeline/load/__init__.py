"""The load wing: shards → training batches (tar index, epoch plan, loader, collate, batch,
neighbour lists) and plain sequential reading (shard_records). It may import the data_pipeline
floor (record, shard_format, manifest) and crystalfm_common; never anything from build/.
"""
