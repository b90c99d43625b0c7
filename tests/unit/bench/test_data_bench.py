"""`linearsr bench data` prints its table: degradation, decode and base_x4's supply / demand."""

from linearsr.main import main


def test_bench_data_prints_supply_against_demand(tiny_shards, capsys):
    assert main(["bench", "data", "--shards", tiny_shards, "--crop", "64", "--photos", "2", "--rounds", "1",
                 "--loader-batches", "0"]) == 0
    out = capsys.readouterr().out
    for line in ("one call per batch of 16", "JPEG q95, libjpeg-turbo (simplejpeg)", "demand per GPU 12.4 samples/s",
                 "degrade_on = device, JPEG shards", "degrade_on = loader, JPEG shards", "load average"):
        assert line in out, line
