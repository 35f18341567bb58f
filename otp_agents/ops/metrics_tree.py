"""The part of the metrics read from the tree when Prometheus scrapes (no events needed):
children by supervisor and state, running instances, each child's memory, pools' load."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from otp_agents.health.memory import MB, rss_bytes, tree_pids
from otp_agents.proc.handle import ChildProcess
from otp_agents.spec.model import Strategy
from otp_agents.tree.supervisor import Supervisor

if TYPE_CHECKING:
    from otp_agents.runtime.tree import Tree

_STATES = ("running", "stopped", "restarting", "held")


class TreeCollector(Collector):
    """Gauges read from the tree at scrape time: children by state, instances up, memory, pools."""

    def __init__(self, tree: Callable[[], Tree | None], label: Callable[[str], str]) -> None:
        self.tree = tree
        self.label = label

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tree = self.tree()
        by_state = GaugeMetricFamily(
            "otp_agents_children", "Children by supervisor and state.", labels=["supervisor", "state"]
        )
        up = GaugeMetricFamily(
            "otp_agents_child_up",
            "Running instances of each child (dynamic children share a label).",
            labels=["path"],
        )
        memory = GaugeMetricFamily(
            "otp_agents_child_memory_bytes",
            "Memory of each child's process tree (the breaker's metric when watched, else RSS).",
            labels=["path"],
        )
        load = GaugeMetricFamily(
            "otp_agents_pool_load",
            "simple_one_for_one pools with max_children: running children / max_children "
            "(the fleet's load, e.g. for a HorizontalPodAutoscaler).",
            labels=["supervisor"],
        )
        capacity = GaugeMetricFamily(
            "otp_agents_pool_capacity", "simple_one_for_one pools: max_children.", labels=["supervisor"]
        )
        if tree is not None:
            self._walk(tree.root, tree, by_state, up, memory)
            self._pools(tree.root, load, capacity)
        yield by_state
        yield up
        yield memory
        yield load
        yield capacity

    def _pools(self, sup: Supervisor, load: GaugeMetricFamily, capacity: GaugeMetricFamily) -> None:
        cap = sup.spec.max_children
        if sup.spec.strategy is Strategy.SIMPLE_ONE_FOR_ONE and cap:
            running = sum(1 for info in sup.which_children() if info.status == "running")
            load.add_metric([sup.path], running / cap)
            capacity.add_metric([sup.path], cap)
        for slot in sup.slots.values():
            if isinstance(slot.instance, Supervisor):
                self._pools(slot.instance, load, capacity)

    def _walk(
        self,
        sup: Supervisor,
        tree: Tree,
        by_state: GaugeMetricFamily,
        up: GaugeMetricFamily,
        memory: GaugeMetricFamily,
    ) -> None:
        counts = dict.fromkeys(_STATES, 0)
        ups: dict[str, float] = {}
        mem: dict[str, float] = {}
        for info in sup.which_children():
            counts[info.status] = counts.get(info.status, 0) + 1
            label = self.label(info.path)
            ups[label] = ups.get(label, 0) + (info.status == "running")
            inst = sup.slots[info.id].instance
            if isinstance(inst, ChildProcess):
                watched = tree.host.memory.last_mb(inst)
                size = (
                    watched * MB
                    if watched is not None
                    else float(sum(rss_bytes(p) for p in tree_pids(inst.pid)))
                )
                mem[label] = mem.get(label, 0.0) + size
            elif isinstance(inst, Supervisor):
                self._walk(inst, tree, by_state, up, memory)
        for state, count in counts.items():
            by_state.add_metric([sup.path, state], count)
        for label, running in ups.items():
            up.add_metric([label], running)
        for label, size in mem.items():
            memory.add_metric([label], size)


__all__ = ["TreeCollector"]
