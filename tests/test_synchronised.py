"""DINO's data-parallel pieces, with threads standing in for the processes of a run (each thread
one rank, a barrier-based sum in place of MPI's all-reduce): the synchronised batch norm is the
batch norm of all ranks' rows, forward and backward, and its gradient is checked against
central differences; the DINO loss's center and marginal entropy are the global batch's."""

import threading

import numpy as np
from conftest import arrays, check_gradients, seeds
from hypothesis import assume, given
from hypothesis import strategies as st

import minivit.functional as F
from minivit import Tensor
from minivit.models.dino import DINOLoss


class ThreadRanks:
    """`size` threads that run `work(rank, sum_over_ranks)` together; sum_over_ranks(array)
    sums an array over them in place, always in rank order, as an all-reduce would."""

    def __init__(self, size):
        self.size, self.parts = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=30)  # a missing rank fails, not hangs

    def _sum_for(self, rank):
        def sum_over_ranks(array):
            self.parts[rank] = array.copy()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].copy())
            self.barrier.wait()  # every rank has read the parts before they change
            array[...] = total
        return sum_over_ranks

    def run(self, work):
        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = work(rank, self._sum_for(rank))
            except BaseException as error:  # noqa: BLE001 (re-raised below)
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def split(sizes):
    """The row slices of consecutive parts of `sizes` rows."""
    ends = np.cumsum([0, *sizes])
    return [slice(start, stop) for start, stop in zip(ends, ends[1:])]


@given(data=st.data())
def test_synchronised_batch_norm_is_the_batch_norm_of_every_ranks_rows(data):
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3), label="rows")
    assume(sum(sizes) >= 2)
    channels = data.draw(st.integers(1, 3))
    x = data.draw(arrays((sum(sizes), channels))) + np.arange(sum(sizes))[:, None]
    weight, bias = data.draw(arrays((channels,))), data.draw(arrays((channels,)))
    upstream = data.draw(arrays((sum(sizes), channels)), label="upstream")

    def forward_backward(x_part, upstream_part, sum_over_processes=None):
        inputs = [Tensor(a.copy(), requires_grad=True) for a in (x_part, weight, bias)]
        out = F.batch_norm(*inputs, sum_over_processes=sum_over_processes)
        out.backward(upstream_part)
        return out.data, *(t.grad for t in inputs)

    expected = forward_backward(x, upstream)
    parts = split(sizes)
    ranks = ThreadRanks(len(sizes)).run(lambda rank, summed: forward_backward(
        x[parts[rank]], upstream[parts[rank]], summed))
    out, grad_x, grad_w, grad_b = zip(*ranks)
    close = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(out), expected[0], **close)
    np.testing.assert_allclose(np.concatenate(grad_x), expected[1], **close)
    # each rank's parameter gradient is its rows' part: the optimizer's all-reduce adds them
    np.testing.assert_allclose(sum(grad_w), expected[2], **close)
    np.testing.assert_allclose(sum(grad_b), expected[3], **close)


@given(data=st.data())
def test_synchronised_batch_norm_gradients_of_one_rank(data):
    """One process's sums go through the same all-reduce path (a sum over one)."""
    batch, channels = data.draw(st.integers(2, 5)), data.draw(st.integers(1, 3))
    x = data.draw(arrays((batch, channels))) + np.arange(batch)[:, None]
    weight, bias = data.draw(arrays((channels,))), data.draw(arrays((channels,)))

    def synchronised(*inputs):
        return F.batch_norm(*inputs, sum_over_processes=lambda array: None)

    np.testing.assert_allclose(synchronised(*map(Tensor, (x, weight, bias))).data,
                               F.batch_norm(*map(Tensor, (x, weight, bias))).data, rtol=1e-12)
    check_gradients(synchronised, x, weight, bias, seed=data.draw(seeds))


def test_dino_center_and_marginal_entropy_are_those_of_the_global_batch():
    rng = np.random.default_rng(0)
    batch, crops, dim, sizes = 5, 3, 4, (2, 3)
    teacher = rng.standard_normal((2, batch, dim))
    student = rng.standard_normal((crops, batch, dim))

    def dino_loss(rows, sum_over_processes=None):
        loss = DINOLoss(dim, teacher_temp=0.5, dtype="float64",
                        sum_over_processes=sum_over_processes)
        loss.center += 0.1
        value, statistics = loss(Tensor(student[:, rows].reshape(-1, dim)),
                                 teacher[:, rows].reshape(-1, dim), 0)
        return float(value.data), statistics, loss.center

    whole_loss, whole, center = dino_loss(slice(None))
    parts = split(sizes)
    ranks = ThreadRanks(2).run(lambda rank, summed: dino_loss(parts[rank], summed))
    for _, statistics, rank_center in ranks:
        np.testing.assert_allclose(rank_center, center, rtol=1e-12)
        assert np.isclose(statistics["teacher_marginal_entropy"],
                          whole["teacher_marginal_entropy"], rtol=1e-12)
    _, alone, alone_center = dino_loss(parts[0])  # without the sums: its own rows' values
    assert not np.allclose(alone_center, center)
    assert not np.isclose(alone["teacher_marginal_entropy"], whole["teacher_marginal_entropy"])
    # the losses (means over each rank's images) weighed by the ranks' shares: the whole's
    shares = np.array(sizes) / batch
    assert np.isclose(sum(share * loss for share, (loss, _, _) in zip(shares, ranks)),
                      whole_loss, rtol=1e-12)
    assert not np.isclose(ranks[0][0], whole_loss)  # a rank's own loss is not the global one
