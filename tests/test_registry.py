import pytest

from deltaserve.experts.codecs import CODECS
from deltaserve.experts.compress import COMPRESSORS
from deltaserve.experts.merge import MERGE_METHODS
from deltaserve.experts.registry import Registry, UnknownNameError
from deltaserve_zoo.corpus import DOCTESTS, SKILLS
from deltaserve_zoo.tasks import TASKS
from deltaserve_zoo.vision import TRANSFORMS


def test_add_lookup_and_miss():
    reg = Registry("widget")
    assert reg.add("a", 1) == 1
    assert reg["a"] == 1 and "a" in reg and list(reg) == ["a"] and len(reg) == 1
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    assert reg["a"] == 1
    with pytest.raises(UnknownNameError) as info:
        reg["b"]
    assert str(info.value) == "unknown widget 'b'; known widgets: ['a']"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("registry", [CODECS, COMPRESSORS, MERGE_METHODS, DOCTESTS, SKILLS, TASKS, TRANSFORMS])
def test_every_family_uses_the_one_registry(registry):
    assert isinstance(registry, Registry) and len(registry) > 0
    with pytest.raises(UnknownNameError, match=f"known {registry.plural}"):
        registry["no-such-name"]
