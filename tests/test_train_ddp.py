"""DistributedDataParallel on CPU: 2 gloo processes train 3 steps; both ranks end with identical weights and only
rank 0 writes files."""

import os
import socket

import torch
import torch.multiprocessing as mp

from dust3r_ns.train.loop import TrainConfig, run

MODEL = ("AsymmetricCroCo3DStereo(img_size=(32, 32), head_type='linear', enc_embed_dim=32, enc_depth=1, "
         "enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2, landscape_only=False)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # each rank gets its own output folder so that any file written by rank 1 would be seen
    cfg = TrainConfig(model=MODEL, resolution=(32, 32), train_pairs=12, test_pairs=4, batch_size=2, epochs=1,
                      lr=1e-3, warmup_epochs=0.2, output_dir=os.path.join(root, f"out{rank}"), progress=False,
                      tensorboard=True, seed=2, device="cpu")
    try:
        res = run(cfg)
        torch.save({k: v.clone() for k, v in res["model"].state_dict().items()}, os.path.join(root, f"w{rank}.pt"))
        torch.save(torch.tensor([res["steps"]]), os.path.join(root, f"steps{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_cpu_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "w0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "w1.pt", weights_only=True)
    assert int(torch.load(tmp_path / "steps0.pt", weights_only=True)) == 3  # 12 pairs / (2 per rank x 2 ranks)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ck = torch.load(tmp_path / "out0" / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert ck["step"] == 3
    for k in w0:
        assert torch.equal(ck["model"][k], w0[k])
    assert (tmp_path / "out0" / "log.txt").is_file()
    assert not (tmp_path / "out1").exists()  # rank 1 wrote nothing
