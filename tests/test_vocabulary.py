from segvol.vocabulary import Vocabulary, default_vocabulary


def test_names_synonyms_and_unknowns():
    v = default_vocabulary()
    assert len(v) == 223
    assert v.resolve("Liver").name == "liver" and v.resolve("Liver").via == "name"
    r = v.resolve("hepar")
    assert (r.name, r.via) == ("liver", "synonym")
    assert v.resolve("IVC").category.preferred_name == "inferior vena cava"
    r = v.resolve("livr")
    assert r.via == "unknown" and r.name == "livr" and "liver" in r.suggestions


def test_indices_are_stable_and_one_based():
    a, b = Vocabulary(), Vocabulary()
    assert [c.index for c in a.categories] == list(range(1, 224))
    assert [c.name for c in a.categories] == [c.name for c in b.categories]
    assert a.categories[0].name == "liver"
    assert a.resolve("liver").category.snomed["CodeValue"] == "10200004"
