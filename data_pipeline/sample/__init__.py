"""The embedded demo sample: small raw sources in the real upstream layouts (see README.md here).

`sample_sources()` gives the source specs a build takes, e.g.
    BuildConfig(sources=[SourceSpec.from_dict(s) for s in sample_sources()], ...)
The files are committed; `python -m data_pipeline.sample.make_sample` regenerates them.
"""
from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent

# (kind, path inside this folder, source name)
_SOURCES = (
    ("mptrj", "mptrj/MPtrj_sample.json.gz", "demo_mptrj"),
    ("cdvae_csv", "cdvae/demo.csv", "demo_csv"),
    ("gnome", "gnome", "demo_gnome"),
    ("structure_files", "cifs", "demo_cifs"),
)


def sample_sources() -> list[dict]:
    """[{"kind", "path" (absolute), "name"}] for the four demo sources, in a fixed order."""
    out = []
    for kind, relative, name in _SOURCES:
        path = SAMPLE_DIR / relative
        if not path.exists():
            raise FileNotFoundError(
                f"demo sample file {path} is missing: regenerate it with `python -m data_pipeline.sample.make_sample`"
            )
        out.append({"kind": kind, "path": str(path), "name": name})
    return out


__all__ = ["SAMPLE_DIR", "sample_sources"]
