"""crystalfm: one console script over the stages data_pipeline → pretrain → finetune → discovery."""
from crystalfm_common.provenance import package_version

__version__ = package_version()
