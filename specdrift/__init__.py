"""specdrift: does speculative decoding pay off on your workload?

The top floor: the `specdrift` command (cli.py, commands.py), the experiment
runner (runner.py) with the drafter preparation it shares with `prepare`
(prepare.py), the cost measurement (cost.py) and the local Prometheus
(prometheus.py). The one place that wires the floors below together."""

__version__ = "0.1.0"
