import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewriting.errors import Cancelled, CheckpointError, IncompatibleError
from rewriting.layers import Trace, flat_keys
from rewriting.seeds import latents
from rewriting.statistics import (
    SecondMoment, collapse_repeats, compute_second_moment, default_batch_size, repeats_hold)
from tests.engine.tiny_models import build


def test_update_matches_brute_force():
    keys = torch.randn(50, 6, dtype=torch.float64)
    s = SecondMoment(6)
    s.update(keys[:20]).update(keys[20:])
    assert s.count == 50
    assert torch.allclose(s.moment, keys.T @ keys, rtol=1e-13, atol=1e-13)
    assert torch.allclose(s.mean, keys.mean(0), rtol=1e-13, atol=1e-13)
    assert torch.allclose(s.matrix, keys.T @ keys / 50, rtol=1e-13, atol=1e-13)


def test_feature_map_keys_are_per_location():
    fmap = torch.randn(2, 3, 4, 5)
    s = SecondMoment(3).update(fmap)
    rows = fmap.permute(0, 2, 3, 1).reshape(-1, 3).double()
    assert s.count == 40 and torch.allclose(s.moment, rows.T @ rows)


def test_keys_repeated_by_nearest_upsampling_are_added_once_and_weighted():
    small = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    up = F.interpolate(small, scale_factor=2, mode="nearest")
    kept, repeats = collapse_repeats(up)
    assert repeats == 4 and torch.equal(kept, small)
    rows = flat_keys(up)
    s = SecondMoment(5).update(up)
    assert s.count == 3 * 8 * 12
    assert torch.allclose(s.moment, rows.T @ rows, rtol=1e-13, atol=1e-13)
    assert torch.allclose(s.sum, rows.sum(0), rtol=1e-13, atol=1e-13)
    assert collapse_repeats(F.interpolate(small, scale_factor=4, mode="nearest"))[1] == 16


def test_one_differing_value_in_any_image_keeps_the_whole_map():
    up = F.interpolate(torch.randn(3, 5, 4, 4, dtype=torch.float64), scale_factor=2, mode="nearest")
    up[2, 4, 7, 6] += 1e-12  # last image, last channel, one location of one block
    kept, repeats = collapse_repeats(up)
    assert repeats == 1 and kept is up
    rows = flat_keys(up)
    assert torch.allclose(SecondMoment(5).update(up).moment, rows.T @ rows, rtol=1e-13, atol=1e-13)
    odd = torch.randn(2, 3, 5, 5)
    assert collapse_repeats(odd)[0] is odd
    rows_only = torch.randn(2, 3, 4, 8).repeat_interleave(2, dim=2)  # equal rows, distinct columns
    assert collapse_repeats(rows_only)[0] is rows_only


def test_float32_keys_agree_with_float64_to_float32_precision():
    keys = torch.relu(torch.randn(3, 16, 32, 32)) + 0.5
    s32 = SecondMoment(16).update(keys)
    s64 = SecondMoment(16).update(keys.double())
    assert s32.count == s64.count == 3 * 1024
    assert ((s32.moment - s64.moment).abs() / s64.moment.abs()).max() < 1e-5
    assert torch.allclose(s32.sum, s64.sum, rtol=1e-5)


def test_merged_shards_equal_one_shot_to_float64_precision():
    keys = torch.randn(1000, 16, dtype=torch.float64) * 3 + 1
    whole = SecondMoment(16).update(keys)
    shards = [SecondMoment(16).update(keys[a:b]) for a, b in [(0, 137), (137, 600), (600, 1000)]]
    merged = shards[0] + shards[1] + shards[2]
    assert merged.count == whole.count
    assert torch.allclose(merged.moment, whole.moment, rtol=1e-14, atol=1e-10)
    assert torch.allclose(merged.sum, whole.sum, rtol=1e-14, atol=1e-10)
    # accumulating in float32 would not get near this: the error is ~1e-16 relative
    rel = ((merged.moment - whole.moment).abs().max() / whole.moment.abs().max()).item()
    assert rel < 1e-14


def test_statistics_are_deterministic_and_split_invariant():
    model = build("equalized").double()  # float64 keys: batch-size effects vanish below 1e-12
    one = compute_second_moment(model, "layer2", "0-39", batch_size=16)
    assert torch.equal(one.moment, compute_second_moment(model, "layer2", "0-39", batch_size=16).moment)
    again = compute_second_moment(model, "layer2", "0-39", batch_size=7)
    split = compute_second_moment(model, "layer2", "0-24") + compute_second_moment(model, "layer2", "25-39")
    assert one.count == 40 * 64 and one.metadata["seeds"] == "0-39"
    assert torch.allclose(one.moment, again.moment, rtol=1e-12, atol=1e-9)
    assert torch.allclose(one.moment, split.moment, rtol=1e-12, atol=1e-9)
    assert split.metadata["seeds"] == "0-39" and split.metadata["layer"] == "layer2"


def test_the_default_batch_follows_the_device():
    # a GPU is launch-bound below a few hundred images a batch (docs/benchmarks.md)
    assert default_batch_size("cuda") == default_batch_size(torch.device("cuda", 0)) == 256
    assert default_batch_size("cpu") == 64
    model = build("equalized")
    default = compute_second_moment(model, "layer2", "0-79")
    assert torch.equal(default.moment, compute_second_moment(model, "layer2", "0-79", batch_size=64).moment)
    with pytest.raises(ValueError, match="batch_size"):
        compute_second_moment(model, "layer2", "0-9", batch_size=0)


def test_latents_drawn_by_threads_give_the_same_statistic():
    model = build("equalized").double()
    here = compute_second_moment(model, "layer2", "0-39", batch_size=8, latent_threads=0)
    threaded = compute_second_moment(model, "layer2", "0-39", batch_size=8, latent_threads=2)
    assert torch.equal(here.moment, threaded.moment) and here.count == threaded.count


def test_float32_model_split_agrees_to_float32_precision():
    model = build("equalized")
    one = compute_second_moment(model, "layer2", "0-39", batch_size=16)
    split = compute_second_moment(model, "layer2", "0-24", batch_size=5) + compute_second_moment(
        model, "layer2", "25-39", batch_size=15)
    assert torch.allclose(one.moment, split.moment, rtol=1e-5, atol=1e-4)


def test_compute_matches_keys_from_a_plain_forward():
    model = build("stylegan2")
    stat = compute_second_moment(model, "layer2", "3-5")
    with Trace(model, "layer2") as tr:
        model(latents([3, 4, 5], model.z_dim))
    rows = flat_keys(tr.keys).double()
    exact = rows.T @ rows
    # float32 products: a few units in the last place of the largest entry
    assert ((stat.moment - exact).abs().max() / exact.abs().max()).item() < 1e-6


def test_overlapping_or_foreign_shards_refuse_to_merge():
    model = build("equalized")
    a = compute_second_moment(model, "layer2", "0-9")
    with pytest.raises(IncompatibleError):
        a + compute_second_moment(model, "layer2", "5-12")
    with pytest.raises(IncompatibleError):
        a + compute_second_moment(model, "layer3", "20-22")
    with pytest.raises(IncompatibleError):
        a + SecondMoment(3)
    # a refused merge in place leaves the statistic as it was (no metadata from the other)
    before, count = dict(a.metadata), a.count
    other = compute_second_moment(model, "layer2", "5-12", model_sha256="cd" * 32)
    with pytest.raises(IncompatibleError):
        a.merge(other)
    assert a.metadata == before and a.count == count


def test_save_and_load_round_trip(tmp_path):
    model = build("equalized")
    stat = compute_second_moment(model, "layer2", "0-9", model_sha256="ab" * 32)
    path = tmp_path / "m.safetensors"
    stat.save(path, {"note": "x"})
    back = SecondMoment.load(path)
    assert back.count == stat.count and torch.equal(back.moment, stat.moment)
    assert back.metadata["model_sha256"] == "ab" * 32 and back.metadata["layer"] == "layer2"
    assert back.metadata["seeds"] == "0-9" and back.metadata["note"] == "x"
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        SecondMoment.load(bad)


def test_progress_and_cancel():
    model = build("equalized")
    seen = []
    compute_second_moment(model, "layer2", "0-9", batch_size=4, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    with pytest.raises(Cancelled):
        compute_second_moment(model, "layer2", "0-9", batch_size=4, should_stop=lambda: True)


def test_runs_on_the_model_device(device):
    model = build("equalized").to(device)
    stat = compute_second_moment(model, "layer1", "0-3")
    assert stat.moment.device.type == device.type and stat.moment.dtype == torch.float64


class RepeatsAtFirst(nn.Module):
    """Keys repeated over 2x2 blocks in the first forward pass, not in later ones.

    ``compute_second_moment`` looks for repeats in its first batch only and then
    assumes them: this model breaks that assumption, which must be caught.
    """

    def __init__(self):
        super().__init__()
        self.z_dim = 8
        self.fc = nn.Linear(8, 4 * 4 * 4)
        self.layer = nn.Conv2d(4, 3, 1)
        self.passes = 0

    def forward(self, z):
        x = F.interpolate(self.fc(z).view(-1, 4, 4, 4), scale_factor=2, mode="nearest")
        if self.passes:
            x = x + 1e-3 * torch.arange(64.0, device=x.device).view(1, 1, 8, 8)
        self.passes += 1
        return self.layer(x)


def plain_moment(model, seeds, batch_size, layer="layer"):
    """The moment from plain forward passes, every location added (no collapse)."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(seeds), batch_size):
            with Trace(model, layer) as tr:
                model(latents(seeds[i:i + batch_size], model.z_dim).to(next(model.parameters()).device))
            rows.append(flat_keys(tr.keys).double().cpu())
    rows = torch.cat(rows)
    return rows.T @ rows, len(rows)


def test_repeats_hold_is_a_device_verdict_on_every_block():
    up = F.interpolate(torch.randn(2, 3, 4, 4), scale_factor=2, mode="nearest")
    assert repeats_hold(up, 4).item() and repeats_hold(up, 1).item() and not repeats_hold(up, 16).item()
    rows = flat_keys(up).double()
    known = SecondMoment(3).update(up, repeats=4)  # the caller's factor: no comparison here
    assert known.count == len(rows) and torch.allclose(known.moment, rows.T @ rows, rtol=1e-6, atol=1e-6)
    up[1, 2, 5, 6] += 1e-6
    assert not repeats_hold(up, 4).item()
    assert not repeats_hold(torch.randn(1, 2, 6, 5), 4).item()  # odd width: no 2x2 blocks
    assert torch.equal(SecondMoment(3).update(up, repeats=1).moment, SecondMoment(3).update(up).moment)


def test_repeats_broken_after_the_first_batch_are_counted_again_in_full(device):
    model = RepeatsAtFirst().to(device)
    stat = compute_second_moment(model, "layer", "0-23", batch_size=8)
    assert model.passes == 3 + 3  # once assuming the first batch's repeats, once in full
    model.passes = 1  # the count that stands is the second, whose batches all break the repeats
    exact, count = plain_moment(model, list(range(24)), 8)
    assert stat.count == count == 24 * 64
    assert torch.allclose(stat.moment.cpu(), exact, rtol=1e-5, atol=1e-5)


def test_repeats_that_hold_are_counted_once_per_block(device, monkeypatch):
    model = build("equalized").to(device)  # layer2 follows a nearest upsampling
    factors, accumulate = [], SecondMoment.accumulate
    monkeypatch.setattr(SecondMoment, "accumulate",
                        lambda self, keys, repeats=None: factors.append(repeats) or accumulate(self, keys, repeats))
    stat = compute_second_moment(model, "layer2", "0-20", batch_size=8)
    assert factors == [4, 4, 4]  # every batch added once per 2x2 block
    exact, count = plain_moment(model, list(range(21)), 8, layer="layer2")
    assert stat.count == count
    assert ((stat.moment.cpu() - exact).abs().max() / exact.abs().max()).item() < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_give_the_eager_statistic():
    model = build("equalized").cuda()
    graphed = compute_second_moment(model, "layer2", "0-99", batch_size=16, graph=True)
    eager = compute_second_moment(model, "layer2", "0-99", batch_size=16, graph=False)
    assert graphed.count == eager.count
    assert ((graphed.moment - eager.moment).abs().max() / eager.moment.abs().max()).item() < 1e-6
    assert torch.allclose(graphed.sum, eager.sum, rtol=1e-6, atol=1e-6)
    # a pass that breaks the first batch's repeats, replayed from a graph, is caught too
    model = RepeatsAtFirst().cuda()
    stat = compute_second_moment(model, "layer", "0-47", batch_size=8, graph=True)
    model.passes = 1
    exact, count = plain_moment(model, list(range(48)), 8)
    assert stat.count == count and torch.allclose(stat.moment.cpu(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pass_that_cannot_be_captured_runs_eagerly():
    model = build("equalized").cuda()
    waits = []
    handle = model.layer1.register_forward_hook(lambda m, a, out: waits.append(out.sum().item()))  # a host wait
    try:
        stat = compute_second_moment(model, "layer2", "0-63", batch_size=16, graph=True)
    finally:
        handle.remove()
    eager = compute_second_moment(model, "layer2", "0-63", batch_size=16, graph=False)
    assert len(waits) >= 4 and stat.count == eager.count
    assert ((stat.moment - eager.moment).abs().max() / eager.moment.abs().max()).item() < 1e-6


def stop_after(batches):
    """A ``should_stop`` that asks to stop once ``batches`` batches were added."""
    polls = []
    return lambda: polls.append(None) or len(polls) > batches


@pytest.mark.parametrize("layer", ["layer1", "layer2"])  # layer2's keys repeat over 2x2 blocks
def test_a_stopped_statistic_resumed_equals_the_uninterrupted_one_bit_for_bit(layer, tmp_path):
    model = build("equalized")
    whole = compute_second_moment(model, layer, "0-40", batch_size=8, model_sha256="ab" * 32)
    with pytest.raises(Cancelled) as stopped:
        compute_second_moment(model, layer, "0-40", batch_size=8, model_sha256="ab" * 32, should_stop=stop_after(3))
    partial = stopped.value.state
    assert partial.count == whole.count * 24 // 41 and partial.metadata["seeds"] == "0-23"
    assert partial.metadata["repeats"] == ("4" if layer == "layer2" else "1")
    partial.save(tmp_path / "partial.safetensors")  # as a worker stores it between claims
    seen = []
    resumed = compute_second_moment(model, layer, "0-40", batch_size=8, model_sha256="ab" * 32,
                                    resume=SecondMoment.load(tmp_path / "partial.safetensors"),
                                    progress=lambda d, n: seen.append(d))
    assert seen == [32, 40, 41]  # counted from where it stopped
    assert resumed.count == whole.count
    assert torch.equal(resumed.moment, whole.moment) and torch.equal(resumed.sum, whole.sum)
    assert resumed.metadata == whole.metadata  # no trace of the resume in the result


def test_a_resume_stopped_again_before_its_first_batch_hands_back_what_it_was_given():
    model = build("equalized")
    with pytest.raises(Cancelled) as first:
        compute_second_moment(model, "layer2", "0-40", batch_size=8, should_stop=stop_after(2))
    with pytest.raises(Cancelled) as second:
        compute_second_moment(model, "layer2", "0-40", batch_size=8, resume=first.value.state,
                              should_stop=lambda: True)
    assert second.value.state.metadata["seeds"] == "0-15"
    assert torch.equal(second.value.state.moment, first.value.state.moment)
    with pytest.raises(Cancelled) as nothing:
        compute_second_moment(model, "layer2", "0-40", batch_size=8, should_stop=lambda: True)
    assert nothing.value.state is None


def test_a_statistic_over_a_prefix_extends_to_more_seeds():
    # a finished statistic records no repeat factor: the first batch after it looks again
    model = build("equalized")
    few = compute_second_moment(model, "layer2", "0-15", batch_size=8)
    more = compute_second_moment(model, "layer2", "0-40", batch_size=8, resume=few)
    whole = compute_second_moment(model, "layer2", "0-40", batch_size=8)
    assert more.count == whole.count and torch.equal(more.moment, whole.moment)


def test_repeats_broken_after_a_resume_are_counted_again_in_full():
    model = RepeatsAtFirst()
    with pytest.raises(Cancelled) as stopped:
        compute_second_moment(model, "layer", "0-23", batch_size=8, should_stop=stop_after(1))
    assert stopped.value.state.metadata["repeats"] == "4"  # the first batch repeated
    stat = compute_second_moment(model, "layer", "0-23", batch_size=8, resume=stopped.value.state)
    model.passes = 1
    exact, count = plain_moment(model, list(range(24)), 8)
    assert stat.count == count and torch.allclose(stat.moment, exact, rtol=1e-5, atol=1e-5)


def test_a_stop_after_the_repeats_broke_hands_back_nothing():
    model = RepeatsAtFirst()
    with pytest.raises(Cancelled) as stopped:  # batch 2 broke the first batch's repeats
        compute_second_moment(model, "layer", "0-23", batch_size=8, should_stop=stop_after(2))
    assert stopped.value.state is None


@pytest.mark.parametrize("change, message", [
    (dict(layer="layer1"), "layer layer1"),
    (dict(model_sha256="cd" * 32), "model_sha256"),
    (dict(seeds="8-15"), "not the first"),
    (dict(seeds="0-7,9"), "not the first"),
])
def test_a_resume_that_does_not_fit_is_refused(change, message):
    model = build("equalized")
    partial = compute_second_moment(model, "layer2", "0-15", batch_size=8, model_sha256="ab" * 32)
    partial.metadata.update(change)
    with pytest.raises(IncompatibleError, match=message):
        compute_second_moment(model, "layer2", "0-40", batch_size=8, model_sha256="ab" * 32, resume=partial)
