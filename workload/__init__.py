"""Datasets into a length-stratified workload: the adapters, the templates,
the strata, the seeded split and sampling, token lengths, the builder and its
summary. Above core/ only."""
