"""Bits survive a restart: a new server process reproduces the hashes of the first."""


def test_restart_reproduces_the_same_hashes(make_server):
    first = make_server("a").start()
    before = first.generate(seed=2024, num_images=2, sampler="dpmpp_2m")
    first.stop()
    second = make_server("b").start()
    after = second.generate(seed=2024, num_images=2, sampler="dpmpp_2m")
    assert [(i["latent_sha256"], i["pixel_sha256"]) for i in before["images"]] == [
        (i["latent_sha256"], i["pixel_sha256"]) for i in after["images"]
    ]
    assert before["manifest"]["runtime"]["reproducibility_key"] == after["manifest"]["runtime"]["reproducibility_key"]
