"""The in-slot solver option of Teacher Trajectories (issue #17, item 3): ComfyUI's own dpmpp_2m / uni_pc inside each
slot, exact against the host's SamplerCustom, part of the set's identity (sets from before the option resume as
DDIM), and closer to the ODE's solution than DDIM at the same number of steps on the real demo teacher."""
import json

import pytest
import torch

from headless import tiny_models
from comfy_rapm import schedule, trajectories
from stock_nodes import call


@pytest.fixture(scope="module")
def teacher(host, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("models") / "checkpoints"
    d.mkdir()
    tiny_models.make_sd15_checkpoint(str(d / "solver_teacher.safetensors"), seed=4)
    folder_paths.add_model_folder_path("checkpoints", str(d))
    with torch.inference_mode():
        model, clip, _ = host.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint("solver_teacher.safetensors")
    return model, clip


def _generate(host, model, clip, name, **overrides):
    args = dict(prompts="a red apple", negative_prompt="blurry", width=64, height=64, count=2, steps=2, fine_steps=3,
                cfg=3.0, seed=5, batch_size=2, name=name)
    args.update(overrides)
    with torch.inference_mode():
        return host.NODE_CLASS_MAPPINGS["RAPMTeacherTrajectory"]().generate(model, clip, **args)[0]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("solver", ["dpmpp_2m", "uni_pc"])
def test_each_slot_is_the_hosts_own_solver_on_that_slots_sigmas(host, teacher, solver):
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom
    model, clip = teacher
    tset = _generate(host, model, clip, f"solver_{solver}", solver=solver)
    assert tset.solver == solver and tset.manifest["inputs"]["solver"] == solver
    ms = model.get_model_object("model_sampling")
    sampler = call(KSamplerSelect, solver)[0]
    encode = host.NODE_CLASS_MAPPINGS["CLIPTextEncode"]()
    with torch.inference_mode():
        positive, negative = encode.encode(clip, "a red apple")[0], encode.encode(clip, "blurry")[0]
    for traj in tset.load():
        start = {"samples": torch.zeros(1, 4, 8, 8)}
        for n, slot in enumerate(schedule.slot_timesteps(2, 3), start=1):
            sigmas = ms.sigmas[slot].clone()
            with torch.inference_mode():  # slot 1 from the seed's noise; slot 2 from where slot 1 ended
                ref = call(SamplerCustom, model, n == 1, traj.seed, 3.0, positive, negative, sampler, sigmas, start)[0]["samples"]
            ours = model.model.process_latent_out(schedule.from_vp(traj.positions[n][None], sigmas[-1], ms))
            assert _rel(ours, ref) <= 1e-4, (solver, n)
            start = {"samples": ours}
    ddim = _generate(host, model, clip, "solver_ddim_same_inputs")
    assert _rel(tset.load()[0].positions[-1], ddim.load()[0].positions[-1]) > 1e-3  # another solver, other numbers


def test_the_solver_is_part_of_a_sets_identity_and_ddim_sets_keep_theirs(host, teacher):
    model, clip = teacher
    ddim = _generate(host, model, clip, "identity")
    assert ddim.solver == "ddim" and "solver" not in ddim.manifest["inputs"]  # exactly what sets made before had
    with pytest.raises(Exception) as err:  # the same name with another solver is another set
        _generate(host, model, clip, "identity", solver="uni_pc")
    assert "solver" in str(err.value) and "'name'" in str(err.value)
    old = json.loads((ddim.folder / "manifest.json").read_text())  # a set written before the option existed
    old.pop("solver", None)
    (ddim.folder / "manifest.json").write_text(json.dumps(old))
    again = _generate(host, model, clip, "identity", solver="ddim")  # resumes (nothing to compute)
    assert again.solver == "ddim" and again.fingerprint() == ddim.fingerprint()
    with pytest.raises(ValueError, match="one of ddim, dpmpp_2m, uni_pc"):
        trajectories.Spec(prompts=["p"], negative_prompt="", width=8, height=8, count=1, steps=1, fine_steps=1, cfg=1.0,
                          seed=0, batch_size=1, solver="heun").inputs()


def test_the_in_slot_solvers_converge_at_their_order_on_the_demo_teacher(host):
    """The solvers inside a slot, through the node's own code, on the real trained emoji teacher: 2 slots, a
    reference on every 12th timestep (84 steps), 4 and 8 steps per slot. On the first slot (999 → 499) DDIM is
    first order (error ÷2.9 from 4 to 8 steps) and dpmpp_2m second order (÷4.2, below DDIM at both), uni_pc
    converges more slowly (÷1.5). Not asserted, because it is this teacher's and not the solvers': after the last
    slot (to t=0) dpmpp_2m and uni_pc land farther from the reference than DDIM (0.173 / 0.070 vs 0.089 at 4 steps;
    the earlier 7M teacher had them at 0.78× / 0.59× of DDIM), which is why the node keeps DDIM as its default."""
    from bench import slot_solvers
    from comfy_rapm import session
    model, positive, negative, noise, _ = slot_solvers.load_teacher("demo", 1, seed=0)

    def first_slot_error(solver, steps):
        with torch.inference_mode():
            positions = session.teacher_positions(model, positive, negative, noise, schedule.slot_timesteps(2, steps),
                                                  3.0, solver=solver)
        return slot_solvers.relative_errors(positions, reference)[0]
    with torch.inference_mode():
        reference = session.teacher_positions(model, positive, negative, noise,
                                              slot_solvers.every_timestep_slots(2, stride=12), 3.0, solver="dpmpp_2m")
    errors = {s: (first_slot_error(s, 4), first_slot_error(s, 8)) for s in ("ddim", "dpmpp_2m", "uni_pc")}
    assert errors["ddim"][1] < errors["ddim"][0] / 2, errors
    assert errors["dpmpp_2m"][1] < errors["dpmpp_2m"][0] / 3.5, errors
    assert errors["dpmpp_2m"][0] < errors["ddim"][0] and errors["dpmpp_2m"][1] < errors["ddim"][1], errors
    assert errors["uni_pc"][1] < errors["uni_pc"][0], errors
