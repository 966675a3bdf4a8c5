"""Cascading parameter randomisation and the Spearman correlation behind it."""

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.evaluation.sanity import parameter_randomisation, spearman


def test_spearman_average_ranks_by_hand():
    a = torch.tensor([[10.0, 20.0, 20.0, 30.0]])  # ranks 1, 2.5, 2.5, 4
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # ranks 1, 2, 3, 4
    # centred: (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5): 4.5 / sqrt(4.5 * 5)
    assert spearman(a, b).item() == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman(b, -b).item() == pytest.approx(-1.0)
    assert torch.isnan(spearman(torch.ones(1, 4), b)).all()


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 3, 7), generator=gen).double()  # many ties
    b = torch.randn(6, 3, 7, generator=gen, dtype=torch.float64).round()
    ours = spearman(a, b)
    for i in range(6):
        expected = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected, abs=1e-12)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    ).eval()


def grad_x_input(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(out, x)
    return (g * x).detach()


def lrp_epsilon(model, x, target):
    x = x.clone().requires_grad_(True)
    return dynamiclrp.explain(model(x), x, target=target, rules="epsilon")


@pytest.mark.parametrize("attribute", [grad_x_input, lrp_epsilon])
def test_randomising_the_top_layer_decorrelates_and_leaves_the_model_alone(attribute):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    rng = torch.get_rng_state()
    copies = []

    def spy(m, x_, t_):
        copies.append(m)
        return attribute(m, x_, t_)

    res = parameter_randomisation(model, spy, x, target, seed=3)
    assert res.layers == ["4", "2", "0"]
    assert res.spearman.shape == (3, 6) and res.spearman_abs.shape == (3, 6)
    rows = res.rows()
    assert [r[0] for r in rows] == ["4", "2", "0"]
    assert rows[0][1] < 0.9  # the top layer already changes the ranking
    assert all(r[1] < 0.9 for r in rows)
    assert all(m is not model for m in copies)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = parameter_randomisation(model, attribute, x, target, seed=3)
    assert torch.equal(again.spearman, res.spearman)
    other = parameter_randomisation(model, attribute, x, target, seed=4)
    assert not torch.equal(other.spearman, res.spearman)


def test_an_attribution_that_ignores_the_model_stays_correlated():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    res = parameter_randomisation(mlp(), lambda m, x_, t_: x_, x, torch.zeros(4).long())
    assert torch.equal(res.spearman, torch.ones(3, 4, dtype=torch.float64))


class Scale(nn.Module):
    """A module without reset_parameters: normal re-initialisation with the parameter's std."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(1.0, 2.0, 8))

    def forward(self, x):
        return x * self.w


def test_explicit_layers_and_modules_without_reset_parameters():
    model = nn.Sequential(Scale(), nn.Linear(8, 2))
    seen = []

    def attribute(m, x_, t_):
        seen.append(m[0].w.detach().clone())
        return grad_x_input(m, x_, t_)

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    res = parameter_randomisation(model, attribute, x, torch.zeros(3).long(), layers=["0"])
    assert res.layers == ["0"]
    assert torch.equal(seen[0], torch.linspace(1.0, 2.0, 8))
    assert not torch.equal(seen[1], seen[0]) and torch.isfinite(seen[1]).all()
    with pytest.raises(ValueError, match="not module names"):
        parameter_randomisation(model, attribute, x, torch.zeros(3).long(), layers=["nope"])
