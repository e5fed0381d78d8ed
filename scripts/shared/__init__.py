"""Helpers the benchmarks, evaluations and demo share (scripts/bench, scripts/eval,
scripts/demo). A script in those folders puts scripts/ on its path once and imports from here;
scripts never import each other."""
