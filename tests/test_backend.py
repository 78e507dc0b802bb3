"""The backend contract and registry, the one path to a timm model, and the bounded export cache."""
import flax.linen as nn
import pytest


def test_backends_are_found_by_name_and_by_module_type():
    import torch2flax
    from torch2flax.backend import BACKEND_REGISTRY, Backend, backend_of, find_backend, get_backend, register_backend
    from torch2flax.export.model import ExportedModel

    native, export = get_backend("native"), get_backend("export")
    assert (native.name, export.name) == ("native", "export")
    assert backend_of(torch2flax.create_model("resnet18", layers=(1, 1, 1, 1))) is native
    assert backend_of(ExportedModel("resnet18")) is export
    assert find_backend(nn.Dense(3)) is None
    with pytest.raises(TypeError, match="Dense is not a module any torch2flax backend builds"):
        backend_of(nn.Dense(3))
    with pytest.raises(ValueError, match=r"unknown backend 'exprot'.*did you mean: export"):
        get_backend("exprot")

    class Twin(nn.Module):
        num_classes: int = 2

    @register_backend
    class ThirdBackend(Backend):  # what a new backend module declares
        name = "third"
        module_types = (Twin,)
        supports = lambda self, arch: arch == "twin"  # noqa: E731
        convert = variable_shapes = to_timm = model_name = config = from_config = None
        with_run_settings = None

    try:
        assert backend_of(Twin()) is get_backend("third") and get_backend("third").supports("twin")
        assert backend_of(Twin()).headless(Twin()).num_classes == 0  # the contract's default
    finally:
        del BACKEND_REGISTRY["third"]


def test_a_backend_must_implement_the_contract():
    from torch2flax.backend import Backend

    class Half(Backend):
        name = "half"
        module_types = ()

        def supports(self, architecture):
            return True

    with pytest.raises(TypeError, match="abstract"):
        Half()


# slow: full-size resnet18s
@pytest.mark.slow
def test_timm_model_is_the_one_path_from_a_name_or_an_instance(tmp_path):
    import timm
    import torch

    from torch2flax.timm_source import head_keys, rebuild_kwargs, timm_model

    src = timm_model("resnet18", num_classes=3, layers=[1, 1, 1, 1])
    assert src.architecture == "resnet18" and src.timm_kwargs == {"layers": [1, 1, 1, 1]}
    assert src.model.fc.out_features == 3 and src.reinitialized == () and not src.model.training

    # A checkpoint: its classifier gives the class count; another num_classes resets the head.
    torch.save(src.model.state_dict(), tmp_path / "r18.pth")
    again = timm_model("resnet18", checkpoint=tmp_path / "r18.pth", num_classes=5, layers=[1, 1, 1, 1])
    assert again.reinitialized == ("fc.weight", "fc.bias") == head_keys(again.model)
    assert torch.equal(again.model.conv1.weight, src.model.conv1.weight)
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint"):
        timm_model("resnet18", pretrained=True, checkpoint=tmp_path / "r18.pth")

    # An instance: the kwargs that rebuild it are recovered when timm's defaults + read-off
    # rates reproduce its structure, else None; the caller's instance keeps its head.
    inst = timm.create_model("resnet18", drop_rate=0.1)
    src = timm_model(inst, num_classes=4)
    assert src.timm_kwargs == {"drop_rate": 0.1, "global_pool": "avg"} and inst.num_classes == 1000
    assert src.model.num_classes == 4 and src.reinitialized == ("fc.weight", "fc.bias")
    assert rebuild_kwargs(timm.create_model("resnet18", layers=[1, 1, 1, 1]), "resnet18") is None
    with pytest.raises(TypeError, match="apply to a model name"):
        timm_model(inst, layers=[1, 1, 1, 1])


@pytest.mark.slow
def test_a_two_headed_checkpoint_counts_its_classes_from_the_first_head():
    from torch2flax.timm_source import checkpoint_classes, classifier_names

    cfg = {"classifier": ("head.linear", "head_dist.linear")}
    assert classifier_names(cfg) == ("head.linear", "head_dist.linear")

    class T:
        shape = (10, 384)

    assert checkpoint_classes({"head.linear.weight": T(), "head_dist.linear.weight": T()}, cfg) == 10
    assert checkpoint_classes({}, cfg) == 0


def test_the_export_cache_is_bounded_rebuilds_what_it_dropped_and_clears():
    import timm

    from torch2flax.export.model import ExportCache, ExportSpec

    cache = ExportCache(max_models=2)
    specs = [ExportSpec("resnet18", (("layers", (1, 1, 1, 1)),), n, 3, (32, 32)) for n in (2, 3, 4)]
    pinned = ExportSpec("resnet18", (), 5, 3, (32, 32), instance_key="resnet18@abc")
    instance = timm.create_model("resnet18", num_classes=5, layers=[1, 1, 1, 1])
    cache.put(pinned, instance)
    for spec in specs:
        cache.put(spec, timm.create_model("resnet18", num_classes=spec.num_classes, layers=[1, 1, 1, 1]))
    assert len(cache) == 3 and specs[0] not in cache and specs[2] in cache  # oldest rebuildable out
    assert cache.model(pinned) is instance  # an instance that cannot be rebuilt stays
    rebuilt = cache.model(specs[0])  # created again from its name and kwargs
    assert rebuilt.num_classes == 2 and len(rebuilt.layer1) == 1 and specs[1] not in cache
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(RuntimeError, match="converted from a timm model instance"):
        cache.model(pinned)


# slow: a LeViT converted and compiled
@pytest.mark.slow
def test_a_two_headed_timm_checkpoint_converts_with_eval_parity(tmp_path):
    """LeViT (and the distilled DeiTs) name two classifiers in their pretrained_cfg: the class
    count comes from the first, and the checkpoint converts (once refused with "unexpected
    key(s) [... 'head_dist.linear.weight']")."""
    import numpy as np
    import timm
    import torch

    import torch2flax
    from tests.helpers import randomize_batchnorm
    from torch2flax.export.parity import eval_parity

    torch.manual_seed(0)
    kwargs = dict(depth=(1, 1, 1), img_size=96)  # levit_128s's code paths, shallower and smaller
    model = randomize_batchnorm(timm.create_model("levit_128s", num_classes=10, **kwargs), seed=1).eval()
    assert isinstance(model.pretrained_cfg["classifier"], tuple)
    torch.save(model.state_dict(), tmp_path / "levit.pth")
    result = torch2flax.convert("levit_128s", checkpoint=tmp_path / "levit.pth", num_classes=10, image_size=96,
                                **kwargs)
    assert result.reinitialized == () and result.module.num_classes == 10
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    assert eval_parity(model, result.module, result.variables, x)["rel"] < 1e-4
