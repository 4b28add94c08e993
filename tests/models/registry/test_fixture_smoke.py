def test_tiny_registry_serves_active_pair(tiny_registry):
    pair = tiny_registry.active()
    assert (pair.model, pair.feature_set) == ("tiny", "tiny")
    record, features = tiny_registry.check_pair("tiny", "tiny")
    assert features.encoder.fingerprint == record.fingerprint
    assert tiny_registry.load_model("tiny").fingerprint == record.fingerprint
