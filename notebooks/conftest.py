"""pytest settings for the notebooks run by nbval (``pytest --nbval-lax notebooks``).

nbval waits a fixed 5 s for each message the kernel publishes after a cell's reply (the cell's
outputs, then its "idle" status), and that wait cannot be configured
(computationalmodelling/nbval#136, #231). On a loaded two-core machine, after a cell that trained
for minutes with live progress bars, the kernel can take longer than that to flush its output
queue, and the cell fails although it ran. The cell's own execution limit
(``--nbval-cell-timeout``) is unaffected.
"""

from nbval.plugin import IPyNbCell

OUTPUT_WAIT_S = 120


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, IPyNbCell):
            item.output_timeout = max(item.output_timeout, OUTPUT_WAIT_S)
