"""The ground floor: cross-cutting helpers every package may use (code version, typed config
from a map, atomic writes, tracking-URI resolution). It imports nothing of ours."""
