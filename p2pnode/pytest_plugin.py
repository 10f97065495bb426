"""pytest plugin: networks of real p2pnode daemons as fixtures.

Installed with p2pnode (entry point ``pytest11``: ``p2pnode``), so every pytest run of a user
who installed p2pnode loads it; it imports only pytest until a fixture is used (``-p
no:p2pnode`` turns it off). The fixtures
are async and need pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio`` on the test)::

    @pytest.mark.testnet(n=4, proxied=True)
    async def test_delivery(testnet):
        await testnet[0].send(testnet[1], "hi")
        await testnet[1].wait_for_message(body="hi")

    async def test_two_networks(testnet_factory):
        small = await testnet_factory(n=2)
        faulty = await testnet_factory(n=3, proxied=True, extra_args=["-v"])

``testnet`` is a started :class:`~p2pnode.testnet.Testnet`; ``@pytest.mark.testnet(...)``
passes its arguments (``n``, default :data:`DEFAULT_NODES`; ``proxied``, ``extra_args``,
``env``). ``testnet_factory(**kwargs)`` starts one more testnet each call and returns it once
ready. Every network a test started is stopped when the test ends, whatever its outcome.

Each network gets its own new temporary directory (short, so the control sockets' paths stay
within the Unix limit) unless ``root=`` is given. It is removed once the test passed; when the
test failed it is kept, and its path and the node logs in it are named in the test's report
(section "p2pnode testnet").
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:  # only for annotations: importing trio is deferred until a fixture is used
    from p2pnode.testnet import Testnet

#: Nodes in the ``testnet`` fixture's network unless ``@pytest.mark.testnet(n=...)`` says.
DEFAULT_NODES: Final = 3
#: Prefix of the temporary directories the fixtures make.
ROOT_PREFIX: Final = "p2pnode-pytest-"

_ROOTS: Final = pytest.StashKey[list[Path]]()

_NEEDS_TRIO: Final = (
    "the {fixture!r} fixture of p2pnode starts daemons from async code and needs pytest-trio: "
    "install it (pip install pytest-trio) and set `trio_mode = true` in the pytest "
    "configuration, or mark the test with @pytest.mark.trio"
)
_NEEDS_ASYNC_TEST: Final = (
    "the {fixture!r} fixture of p2pnode works only in trio tests: write the test as "
    "`async def` and run it with pytest-trio (`trio_mode = true` in the pytest configuration, "
    "or @pytest.mark.trio on the test)"
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``testnet`` marker."""
    config.addinivalue_line(
        "markers",
        "testnet(n=3, *, proxied=False, extra_args=(), env=None): how the p2pnode `testnet` "
        "fixture builds its network of real daemons",
    )


@pytest.fixture
def _p2pnode_requires_trio(request: pytest.FixtureRequest) -> None:
    """Fail with a clear message, before any async fixture is attempted, when the test cannot
    run the fixtures (no pytest-trio, or not a trio test)."""
    fixture = next(
        (name for name in ("testnet", "testnet_factory") if name in request.fixturenames),
        "testnet",
    )
    plugins = request.config.pluginmanager.get_plugins()
    if not any(getattr(plugin, "__name__", None) == "pytest_trio.plugin" for plugin in plugins):
        pytest.fail(_NEEDS_TRIO.format(fixture=fixture), pytrace=False)
    if request.node.get_closest_marker("trio") is None:
        pytest.fail(_NEEDS_ASYNC_TEST.format(fixture=fixture), pytrace=False)


@pytest.fixture
async def testnet_factory(
    _p2pnode_requires_trio: None, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[Testnet]]]:
    """``await testnet_factory(n=..., proxied=..., extra_args=..., env=..., root=...)``: a
    started :class:`~p2pnode.testnet.Testnet`, stopped when the test ends."""
    import trio  # noqa: PLC0415 (deferred: the plugin loads in runs that never use trio)

    from p2pnode.testnet import Testnet  # noqa: PLC0415

    roots = request.node.stash.setdefault(_ROOTS, [])
    async with trio.open_nursery() as nursery:
        stop = trio.Event()

        async def run(kwargs: dict[str, Any], *, task_status: Any) -> None:
            # The testnet lives in this fixture's task, so that it is entered and left in the
            # same task whichever task asked for it.
            async with Testnet(**kwargs) as net:
                task_status.started(net)
                await stop.wait()

        async def factory(n: int = DEFAULT_NODES, **kwargs: Any) -> Testnet:
            if kwargs.get("root") is None:
                kwargs["root"] = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
                roots.append(kwargs["root"])
            net: Testnet = await nursery.start(run, {"n": n, **kwargs})
            return net

        yield factory
        stop.set()


@pytest.fixture
async def testnet(
    testnet_factory: Callable[..., Awaitable[Testnet]], request: pytest.FixtureRequest
) -> Testnet:
    """A started :class:`~p2pnode.testnet.Testnet`, built as ``@pytest.mark.testnet(...)``
    says (default: :data:`DEFAULT_NODES` nodes, not proxied)."""
    marker = request.node.get_closest_marker("testnet")
    args: tuple[Any, ...] = marker.args if marker is not None else ()
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    return await testnet_factory(*args, **kwargs)


@pytest.hookimpl(hookwrapper=True)  # the old style: works with every pytest >= 7
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Remove the fixtures' temporary directories after a passing test; after a failing one,
    keep them and name them in the report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call":
        return
    roots = item.stash.get(_ROOTS, [])
    if report.failed:
        lines = []
        for root in roots:
            lines.append(f"homes and logs kept in {root}")
            lines.extend(f"  {log}" for log in sorted(root.glob("node*.log")))
        if lines:
            report.sections.append(("p2pnode testnet", "\n".join(lines)))
    else:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
