"""Raw crystal files → validated, deduplicated, split webdataset shards; shards → training batches."""
from data_pipeline.record import CrystalRecord

__all__ = ["CrystalRecord"]
