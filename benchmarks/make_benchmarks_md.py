"""Assemble BENCHMARKS.md from the summary below and every benchmarks/results/*.md section file.

    python benchmarks/make_benchmarks_md.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = (ROOT / "benchmarks" / "SUMMARY.md").read_text()
ORDER = ["readers", "data_build", "data_scale", "build_scale", "loader", "neighbor_scatter", "trainer", "ddpm_step", "finetune", "screening",
         "gpu_acceptance"]


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    files = sorted(results.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    parts = [HEADER.rstrip() + "\n"]
    for path in files:
        body = path.read_text().strip()
        # demote the section file's headings by one level under this page's title
        body = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
        parts.append(f"\n<!-- from benchmarks/results/{path.name} -->\n{body}\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote BENCHMARKS.md from {len(files)} result files")


if __name__ == "__main__":
    main()
