"""`python -m enrich ...` (inside the enrichment environment). vLLM spawns workers: keep the main guard."""

from enrich.job import main

if __name__ == "__main__":
    raise SystemExit(main())
