"""Bits survive a restart: a new server process reproduces the hashes of another (the session's server)."""


def test_restart_reproduces_the_same_hashes(server, make_server):
    before = server.generate(seed=2024, num_images=2, sampler="dpmpp_2m")
    second = make_server("b").start()
    after = second.generate(seed=2024, num_images=2, sampler="dpmpp_2m")
    assert [(i["latent_sha256"], i["pixel_sha256"]) for i in before["images"]] == [
        (i["latent_sha256"], i["pixel_sha256"]) for i in after["images"]
    ]
    assert before["manifest"]["runtime"]["reproducibility_key"] == after["manifest"]["runtime"]["reproducibility_key"]
