"""The desktop app as a process of its own, driven the way a user drives it, for the
resume test (tests/test_resume_app.py): not a test module.

    python tests/app_driver.py start ENDPOINT STATUS_FILE IMAGES...
        opens the app with IMAGES listed, adds a blur step and presses Process all;
        runs until it is killed.
    python tests/app_driver.py resume ENDPOINT STATUS_FILE
        opens the app, waits for the offer to resume, presses its Resume button, and
        when the batch is done writes the images' states to STATUS_FILE and closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from helpers_gui import ScriptedDialogs  # noqa: E402

from gui.app import ImageFleetApp  # noqa: E402
from gui.viewmodel.batch import JobStatus  # noqa: E402
from gui.viewmodel.requests import RequestStep  # noqa: E402

STEP = RequestStep("gaussian_blur", {"ksize": 31})


def main() -> None:
    mode, endpoint, status_file, *paths = sys.argv[1:]
    status = Path(status_file)
    app = ImageFleetApp(endpoint=endpoint, dialogs=ScriptedDialogs(), open_paths=paths)
    state = {"pressed": False}

    def write(**facts: object) -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(status)

    def tick() -> None:
        process = app.process
        if mode == "start" and not state["pressed"]:
            if app.connected is not None and len(process.batch) == len(paths):
                app.process_view.clear_operation()  # the pipeline alone runs
                process.pipeline.append(STEP)
                app.process_view.set_pipeline(process.pipeline, {})
                process.process_all()
                state["pressed"] = True
                write(pressed=True)
        elif mode == "resume":
            if not state["pressed"] and app.connected is not None:
                offers = [i for i, m in enumerate(app.messages.messages) if m.action == "Resume"]
                if offers:
                    # the button on screen, as a click presses it
                    app.message_area.rows[offers[0]].action_button.invoke()
                    state["pressed"] = True
            elif state["pressed"] and len(process.batch) and not process.batch.running:
                jobs = process.batch.jobs
                if all(job.status in (JobStatus.DONE, JobStatus.FAILED) for job in jobs):
                    write(states=[job.status.value for job in jobs],
                          names=[job.name for job in jobs],
                          messages=app.messages and [m.text for m in app.messages.messages],
                          errors=app.errors_shown, failures=[repr(f) for f in app.failures])
                    app.close()
                    return
        app.after(50, tick)

    app.after(50, tick)
    app.mainloop()


if __name__ == "__main__":
    main()
