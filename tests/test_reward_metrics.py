"""dpalogic.runtime.metrics.pair_rewards, the one definition of the implicit rewards, against hand computations."""

from __future__ import annotations

import pytest
import torch

from dpalogic.runtime.metrics import pair_rewards


def test_rewards_with_reference_and_lengths_by_hand():
    chosen = torch.tensor([-10.0, -4.0, -7.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-12.0, -3.0, -7.0], dtype=torch.float64)
    ref_c = torch.tensor([-11.0, -5.0, -6.0], dtype=torch.float64)
    ref_r = torch.tensor([-11.0, -2.0, -9.0], dtype=torch.float64)
    # reward = β (log π − log π_ref), β = 0.5: chosen 0.5, 0.5, −0.5; rejected −0.5, −0.5, 1.0
    m = pair_rewards(chosen, rejected, ref_c, ref_r, beta=0.5)
    assert m["chosen_rewards"].tolist() == [0.5, 0.5, -0.5]
    assert m["rejected_rewards"].tolist() == [-0.5, -0.5, 1.0]
    assert m["margins"].tolist() == [1.0, 1.0, -1.5]
    assert m["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert m["logp_accuracy"].tolist() == [1.0, 0.0, 0.0]  # −10 > −12; −4 < −3; a tie is not a win
    assert m["chosen_logps"].tolist() == [-10.0, -4.0, -7.0] and not m["chosen_logps"].requires_grad
    assert all(v.dtype == torch.float64 for v in m.values())
    # per token: the log-ratio divided by the token count (0 tokens counts as 1)
    lengths_c, lengths_r = torch.tensor([2, 0, 4]), torch.tensor([4, 1, 3])
    m = pair_rewards(chosen, rejected, ref_c, ref_r, beta=0.5, chosen_lengths=lengths_c, rejected_lengths=lengths_r)
    assert m["chosen_rewards"].tolist() == [0.25, 0.5, -0.125]
    assert m["rejected_rewards"].tolist() == pytest.approx([-0.125, -0.5, 1.0 / 3.0], rel=1e-15)


def test_rewards_without_reference_are_beta_log_pi_in_float32():
    chosen = torch.tensor([-1.5, -8.0], dtype=torch.bfloat16)
    rejected = torch.tensor([-3.0, -2.0], dtype=torch.bfloat16)
    m = pair_rewards(chosen, rejected, beta=2.0)
    assert m["chosen_rewards"].tolist() == [-3.0, -16.0] and m["rejected_rewards"].tolist() == [-6.0, -4.0]
    assert m["margins"].tolist() == [3.0, -12.0] and m["accuracy"].tolist() == [1.0, 0.0]
    assert all(v.dtype == torch.float32 for v in m.values())
