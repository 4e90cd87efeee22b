"""The GPU default and GPU requests, decided from what the autoscaler reports (runtime/autoscaler.py),
and GPU nodes without CUDA (runtime/nodes.py): the logic, without Ray. The same code on Ray's fake
multi-node provider, autoscaler v1 and v2, is in tests/cluster/test_autoscaling.py."""

from __future__ import annotations

import pytest
import torch

from diffmix_ray.errors import DiffmixError
from diffmix_ray.runtime import autoscaler, local_ray, nodes
from diffmix_ray.runtime.autoscaler import (ALIVE, CONFIGURED, INFEASIBLE, LAUNCHING, NONE, STUCK, WAIT, Answer,
                                            Look, judge)


def v1(version, demand=False, launching=False, gpus=0.0):
    return Look(gpus, "v1", float(version), demand_seen=demand, launching_gpus=launching)


def v2(version, demand=False, launching=False, infeasible=False):
    return Look(0.0, "v2", float(version), demand_seen=demand, launching_any=launching, infeasible=infeasible)


def test_gpus_alive_or_published_node_types_answer_at_once():
    assert judge([Look(1.0, "v1")], 1) == ALIVE
    assert judge([Look(1.0, "none")], 0.5) == ALIVE  # a fraction of one GPU fits
    assert judge([Look(1.0, "v1")], 2) == WAIT  # one node must hold the whole request
    assert judge([Look(0.0, "v2", configured_gpus=4.0)], 1) == CONFIGURED  # a later Ray publishes node types
    assert judge([Look(0.0, "v1", configured_gpus=0.0)], 1) == NONE
    assert judge([Look(0.0, "readonly")], 1) == NONE  # `ray start` by hand: nothing is ever added


def test_v1_launching_a_gpu_node_is_a_yes():
    history = [v1(1), v1(1, demand=True), v1(2, demand=True), v1(3, demand=True, launching=True)]
    assert judge(history, 1) == LAUNCHING


def test_v1_that_starts_nothing_for_three_updates_is_stuck_not_forever():
    history = [v1(1), v1(1, demand=True)]
    assert judge(history, 1) == WAIT
    history += [v1(1, demand=True)] * 5 + [v1(2, demand=True), v1(3, demand=True)]
    assert judge(history, 1) == WAIT  # polled often, but only two updates since the demand appeared
    assert judge(history + [v1(4, demand=True)], 1) == STUCK


def test_v1_without_the_demand_in_sight_waits():
    assert judge([v1(v) for v in range(10)], 1) == WAIT  # the raylet has not reported the probe yet


def test_v2_infeasible_is_definite_and_a_launch_is_a_yes():
    assert judge([v2(1), v2(2, demand=True, infeasible=True)], 1) == INFEASIBLE
    handmade = Look(0.0, "v2", 2.0, demand_seen=True, infeasible=True, handmade=True)
    assert judge([v2(1), handmade], 1) == NONE  # `ray start` by hand with v2: it adds nothing, ever
    assert judge([v2(1), v2(2, demand=True, launching=True)], 1) == LAUNCHING
    assert judge([v2(1, launching=True)], 1) == WAIT  # a launch before our demand is someone else's
    assert judge([v2(1, demand=True), v2(2, demand=True), v2(3, demand=True), v2(4, demand=True)], 1) == STUCK


class Cluster:
    """Fakes what gpu_answer reads from Ray: a list of looks, one per poll."""

    def __init__(self, looks: list[Look], monkeypatch, probe_result: dict | None = None):
        self.looks, self.cancelled, self.polls = list(looks), [], 0
        monkeypatch.setattr(autoscaler, "look", self.look)
        monkeypatch.setattr(autoscaler, "_alive_gpus", lambda: 0.0)
        probe = self

        class Task:
            def remote(self):
                return "probe-ref"

        monkeypatch.setattr(autoscaler, "_probe_task", lambda gpus: Task())
        import ray

        monkeypatch.setattr(ray, "wait", lambda refs, timeout: ([refs[0]] if probe_result and self.polls > 2 else [],
                                                                 []))
        monkeypatch.setattr(ray, "get", lambda ref: probe_result)
        monkeypatch.setattr(ray, "cancel", lambda ref, force: probe.cancelled.append(ref))

    def look(self, gpus):
        self.polls += 1
        return self.looks.pop(0) if len(self.looks) > 1 else self.looks[0]


def test_an_autoscaler_that_never_answers_is_bounded(monkeypatch):
    clock = iter(range(0, 10_000, 5))
    cluster = Cluster([v1(1)], monkeypatch)
    answer = autoscaler.gpu_answer(1.0, private=False, sleep=lambda s: None, clock=lambda: float(next(clock)))
    assert answer.verdict == STUCK and "did not answer within" in answer.why
    assert cluster.cancelled == ["probe-ref"]  # the probe's demand does not linger


def test_a_cluster_whose_monitor_never_reports_adds_no_nodes(monkeypatch):
    clock = iter(range(0, 10_000, 1))
    Cluster([Look(0.0, "none")], monkeypatch)
    answer = autoscaler.gpu_answer(1.0, private=False, sleep=lambda s: None, clock=lambda: float(next(clock)))
    assert answer.verdict == NONE and "no autoscaler" in answer.why


def test_a_private_ray_is_answered_from_its_nodes_without_a_probe(monkeypatch):
    cluster = Cluster([v1(1)], monkeypatch)
    assert autoscaler.gpu_answer(1.0, private=True).verdict == NONE
    assert cluster.polls == 0 and not cluster.cancelled


def test_ray_train_stages_check_cuda_on_a_gpu_node_that_is_up(monkeypatch):
    """Ray Train's workers would fail inside its NCCL set-up on such a node, before any of our code."""
    facts = {"node": "node 10.0.0.7 (id 3f2a)", "cuda": False, "message": "no CUDA on node 10.0.0.7"}
    Cluster([Look(1.0, "v1")], monkeypatch, probe_result=facts)
    assert autoscaler.gpu_answer(1.0, private=False, sleep=lambda s: None).facts == {}  # actors check themselves
    cluster = Cluster([Look(1.0, "v1")], monkeypatch, probe_result=facts)
    cluster.polls = 3  # the fake probe is ready at once
    answer = autoscaler.gpu_answer(1.0, private=False, check_cuda=True, sleep=lambda s: None)
    assert answer.verdict == ALIVE and answer.facts == facts
    busy = Cluster([Look(1.0, "v1")], monkeypatch)  # every GPU busy: no answer within CHECK_S, not a hang
    clock = iter(range(0, 1000))
    answer = autoscaler.gpu_answer(1.0, private=False, check_cuda=True, sleep=lambda s: None,
                                   clock=lambda: float(next(clock)))
    assert answer.verdict == ALIVE and answer.facts == {} and busy.cancelled == ["probe-ref"]


def test_the_probe_reports_what_it_found_on_the_gpu_node(monkeypatch):
    facts = {"node": "node 10.0.0.7 (id 3f2a91c0d4e5)", "cuda": False, "message": "no CUDA on node 10.0.0.7"}
    cluster = Cluster([v1(1)], monkeypatch, probe_result=facts)
    answer = autoscaler.gpu_answer(1.0, private=False, sleep=lambda s: None)
    assert answer.verdict == ALIVE and answer.facts == facts and not cluster.cancelled  # it ran: nothing to cancel


# ---------------------------------------------------------------------------------------------
# resolve_gpus: what each verdict means for a default and for a request
# ---------------------------------------------------------------------------------------------
def _answering(monkeypatch, verdict, facts=None):
    monkeypatch.setattr(autoscaler, "gpu_answer", lambda gpus, private, check_cuda: Answer(
        verdict, f"because {verdict}", facts or {}))


@pytest.mark.parametrize("verdict, expected", [(ALIVE, 1.0), (LAUNCHING, 1.0), (CONFIGURED, 1.0), (NONE, 0.0)])
def test_the_default_follows_the_verdict(monkeypatch, capsys, verdict, expected):
    _answering(monkeypatch, verdict)
    assert local_ray.resolve_gpus(None, "generate", "actor") == expected
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert ("generate: 1 GPU per actor" in said) if expected else ("running on CPU in fp32" in said)


@pytest.mark.parametrize("verdict", [INFEASIBLE, STUCK])
def test_a_default_the_autoscaler_will_not_serve_is_an_error_naming_the_flag(monkeypatch, verdict):
    """Not a quiet fall back to CPU: the cluster may have GPU types it cannot add right now."""
    _answering(monkeypatch, verdict)
    with pytest.raises(DiffmixError, match=rf"generate: no GPU for the default .*because {verdict}.*"
                                           r"--gpus-per-actor 0"):
        local_ray.resolve_gpus(None, "generate", "actor")


@pytest.mark.parametrize("verdict", [NONE, INFEASIBLE, STUCK])
def test_an_unsatisfiable_request_is_an_error_not_an_endless_wait(monkeypatch, verdict):
    _answering(monkeypatch, verdict)
    with pytest.raises(DiffmixError, match=r"--gpus-per-worker 2: this cluster has no node type with 2 GPU.*"
                                           r"pass --gpus-per-worker 0 to run on CPU"):
        local_ray.resolve_gpus(2, "finetune", "worker")


def test_what_the_user_asks_wins(monkeypatch):
    _answering(monkeypatch, LAUNCHING)
    assert local_ray.resolve_gpus(0.5, "generate", "actor") == 0.5
    monkeypatch.setattr(autoscaler, "gpu_answer", lambda *a, **k: pytest.fail("0 GPUs asks the cluster nothing"))
    assert local_ray.resolve_gpus(0, "score", "actor") == 0.0


def test_a_gpu_node_without_cuda_found_by_the_probe_is_named(monkeypatch):
    facts = {"node": "node 10.0.0.7 (id 3f2a91c0d4e5)", "cuda": False,
             "message": "node 10.0.0.7 (id 3f2a91c0d4e5) advertises GPUs to Ray (Ray assigned GPU 0) but ..."}
    _answering(monkeypatch, ALIVE, facts)
    monkeypatch.delenv(nodes.GPU_WITHOUT_CUDA_ENV, raising=False)
    with pytest.raises(DiffmixError, match=r"^generate: node 10\.0\.0\.7 \(id 3f2a91c0d4e5\) advertises GPUs"):
        local_ray.resolve_gpus(None, "generate", "actor")
    monkeypatch.setenv(nodes.GPU_WITHOUT_CUDA_ENV, "cpu")  # tests and the fake provider: run there on CPU
    assert local_ray.resolve_gpus(None, "generate", "actor") == 1.0


# ---------------------------------------------------------------------------------------------
# A GPU without CUDA inside an actor, and the one line that reaches the user
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_where_there_is_none(monkeypatch, warnings_seen):
    from diffmix_ray.models.loader import runtime_policy

    monkeypatch.delenv(nodes.GPU_WITHOUT_CUDA_ENV, raising=False)
    with pytest.raises(DiffmixError, match="a CUDA device was requested but torch .* sees none on this machine"):
        runtime_policy("cuda")
    monkeypatch.setenv(nodes.GPU_WITHOUT_CUDA_ENV, "cpu")
    assert runtime_policy("cuda") == ("cpu", torch.float32)
    assert runtime_policy("cuda", "fp16") == ("cpu", torch.float32)  # no half precision on a CPU
    assert any("running on its CPU in float32" in w for w in warnings_seen)


def test_the_remote_diffmix_error_is_found_in_what_ray_hands_back():
    class ActorDiedError(Exception):  # Ray keeps only the text of an actor's __init__ failure
        pass

    remote = ActorDiedError("The actor died because of an error raised in its creation task, ray::MapWorker("
                            "MapBatches(Translator)).__init__() (pid=1, ip=10.0.0.7)\nTraceback (most recent call "
                            "last):\n  File \"x.py\", line 1, in __init__\ndiffmix_ray.errors.DiffmixError: node "
                            "10.0.0.7 (id 3f2a91c0d4e5) advertises GPUs to Ray but torch sees no CUDA device there")
    wrapper = RuntimeError("")
    wrapper.__cause__ = remote
    found = nodes.remote_error(wrapper)
    assert isinstance(found, DiffmixError) and str(found).startswith("node 10.0.0.7 (id 3f2a91c0d4e5) advertises")
    assert nodes.remote_error(RuntimeError("CUDA out of memory")) is None

    with pytest.raises(DiffmixError) as raised, nodes.remote_errors_as_one_line():
        raise wrapper
    assert "\n" not in str(raised.value)
    with pytest.raises(KeyError), nodes.remote_errors_as_one_line():
        raise KeyError("not ours")


def test_a_private_local_ray_without_gpus_runs_on_cpu_and_refuses_gpu_requests(ray_local):
    """The Ray a stage starts for itself (here the session's) has no autoscaler: answered at once."""
    assert local_ray.started_here()
    assert local_ray.resolve_gpus(None, "generate", "actor") == 0.0
    with pytest.raises(DiffmixError, match=r"--gpus-per-actor 1: .*\(it has no autoscaler that can add nodes\)"):
        local_ray.resolve_gpus(1, "generate", "actor")
