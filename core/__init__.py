"""The ground floor: the experiment config, the cache's paths, child
processes, the target model, the environment, launching vLLM arms, and the
contracts (core/contracts.py) that every other folder reads and writes by.
It imports nothing of the project outside itself."""
