"""Time to result at the PACS: ``pneumotriage listen`` with the demo models between a sender and a real Orthanc
(Debian's, started here on loopback), each figure against a baseline measured in the same run.

- one study of one 1024 px JPEG DICOM (SIIM's encoding): from the sender's last image acknowledged to the SR
  stored in Orthanc (polled through its REST API), less the inactivity timeout (``--idle``) the node waits by
  design; target <= 5 s on the 2-core machine;
- ``--studies N`` studies (default 200) pushed back to back: each study's time to result as the node measures it
  (last image received to the destination's acknowledgement, less the timeout), and the node's throughput in
  images/s (received and triaged, SR and SEG made) against ``pneumotriage.scan.run`` making the same SR and SEG
  over the same files in one folder (does the node keep up?), and how long Orthanc then took to store them.

    python benchmarks/listen.py                 # needs Debian's orthanc, and the pacs extra
    python benchmarks/listen.py --studies 50 --idle 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' Orthanc launcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--idle", type=float, default=1.0, help="the node's inactivity timeout (excluded)")
    parser.add_argument("--precision", default="fp32", help="fp32 by default: many hospital CPUs lack bf16")
    args = parser.parse_args()

    from orthanc import Orthanc
    from pynetdicom import AE

    from pneumotriage.demo import NAMES, demo_weights
    from pneumotriage.listen import Destination, Listener, ListenOptions, NodeOptions
    from pneumotriage.models import load_model
    from pneumotriage.scan import ScanOptions
    from pneumotriage.scan import run as run_scan
    from pneumotriage.synth import write_study

    demo_weights()
    classifier, segmenter = load_model(NAMES[0]), load_model(NAMES[1])
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        one = write_study(root / "one", 1, positive_rate=1.0, size=(args.size, args.size), seed=1)
        many = write_study(root / "many", args.studies, positive_rate=0.3, size=(args.size, args.size), seed=2)
        pacs = Orthanc(root / "orthanc").start()
        options = ScanOptions.of(device="cpu", precision=args.precision, tta=True)
        listener = Listener(
            root / "node",
            classifier=classifier,
            segmenter=segmenter,
            scan_options=options,
            node=NodeOptions(port=0),
            options=ListenOptions(idle_s=args.idle, send_to=Destination("ORTHANC", "127.0.0.1", pacs.dicom_port)),
        )
        stop = threading.Event()
        thread = threading.Thread(target=listener.serve, args=(stop,), daemon=True)
        thread.start()
        try:
            import pydicom

            def push(files: list[Path]) -> float:
                ae = AE(ae_title="BENCH")
                datasets = [pydicom.dcmread(f) for f in files]
                for context in dict.fromkeys((d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets):
                    ae.add_requested_context(*context)
                assoc = ae.associate("127.0.0.1", listener.node.port, ae_title="PNEUMOTRIAGE")
                for d in datasets:
                    assoc.send_c_store(d)
                last = time.monotonic()
                assoc.release()
                return last

            # One study: the last image acknowledged -> its SR in Orthanc.
            sent = push([one.out / one.images[0].path])
            while not pacs.instances("SR"):
                time.sleep(0.05)
            single = time.monotonic() - sent - args.idle
            print(f"one {args.size} px study: {single:.2f} s from its last image to its SR in Orthanc "
                  f"(the {args.idle:g} s inactivity timeout excluded); target <= 5 s")  # fmt: skip

            # Many studies back to back.
            files = [many.out / im.path for im in many.images]
            started = time.monotonic()
            pushed_s = push(files) - started
            while sum(1 for s in listener.inbox.states() if s.triaged_at is not None) < args.studies + 1:
                time.sleep(0.05)
            node_s = time.monotonic() - started - args.idle  # received and triaged (rows, SR, SEG), less the timeout
            while sum(1 for s in listener.inbox.states() if s.time_to_result_s is not None) < args.studies + 1:
                time.sleep(0.05)
            stored_s = time.monotonic() - started - args.idle - node_s  # then Orthanc acknowledging the last of them
            waits = sorted(
                s.time_to_result_s - args.idle for s in listener.inbox.states() if s.time_to_result_s is not None
            )[: args.studies + 1]
        finally:
            stop.set()
            thread.join(timeout=120)
            listener.close()
            pacs.stop()
        t0 = time.monotonic()
        same = options.but(dicom_sr=True, dicom_seg=True)  # the node's work: rows, SR and SEG
        run_scan([many.out], root / "scan", classifier=classifier, segmenter=segmenter, options=same)
        scan_s = time.monotonic() - t0
    print(
        f"{args.studies} studies back to back: time to result median {statistics.median(waits):.2f} s, "
        f"90th percentile {waits[int(0.9 * (len(waits) - 1))]:.2f} s, worst {waits[-1]:.2f} s (timeout excluded)"
    )
    print(
        f"throughput: the node {args.studies / node_s:.2f} images/s received and triaged (the {args.idle:g} s "
        f"timeout excluded) against the scan of the same folder {args.studies / scan_s:.2f} images/s: "
        f"{scan_s / node_s:.2f}x the scan's (receiving the {args.studies} images took {pushed_s:.1f} s of it); "
        f"then Orthanc took {stored_s:.1f} s more to store the last results"
    )


if __name__ == "__main__":
    main()
