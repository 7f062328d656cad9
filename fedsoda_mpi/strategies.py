"""The registry of aggregation strategies (`fed.aggregator` -> a `strategy.Strategy`), apart from the
strategies themselves so that no import cycle can form: this module imports them, none of them imports it."""
from __future__ import annotations

from functools import partial

from .aggregate import FedAvg
from .comm import Schema
from .fedsrd import FedSRD
from .strategy import Strategy

STRATEGIES = {"fedavg": FedAvg, "fedsrd": partial(FedSRD, svd=True), "fedsrd-e": partial(FedSRD, svd=False)}


def strategy_for(cfg, schema: Schema) -> Strategy:
    """The strategy named by fed.aggregator, built from the agreed dense adapter schema."""
    return STRATEGIES[cfg.fed.aggregator](schema, cfg)
