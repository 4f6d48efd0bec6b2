import pytest
import torch
from diffusers import DDIMScheduler

from dori_utils.noising import add_noise, predicted_noise, prediction_target


def _scheduler(kind):
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predicted_noise_inverts_the_target(kind):
    scheduler = _scheduler(kind)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((2, 4, 3, 8, 8), generator=generator)
    t = torch.tensor([0, 250, 600, 998])
    x_t = add_noise(scheduler, x0, noise, t)
    target = prediction_target(scheduler, x0, noise, t)
    assert torch.allclose(x_t, scheduler.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(predicted_noise(scheduler, target, x_t, t), noise, atol=1e-4)


def test_velocity_target_matches_diffusers():
    scheduler = _scheduler("v_prediction")
    x0, noise = torch.randn((2, 3, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 999])
    assert torch.allclose(prediction_target(scheduler, x0, noise, t), scheduler.get_velocity(x0, noise, t))
    assert torch.equal(prediction_target(_scheduler("epsilon"), x0, noise, t), noise)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(_scheduler("sample"), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.tensor([0]))
