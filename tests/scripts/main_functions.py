import asyncio, dataclasses, enum
import zfabric


@dataclasses.dataclass(frozen=True)
class Pair:
    a: int
    b: int


class Oops(Exception):
    pass


def double(x):
    return 2 * x


def pair(x):
    return Pair(x, x + 1)


def oops():
    raise Oops("from the script")


async def amain():
    async with zfabric.local(workers=1) as client:
        print("map", await client.map(double, range(5)))
        print("pair", await client.submit(pair, 3))
        print("echo", await client.submit(pair, Pair(1, 2).a))
        try:
            await client.submit(oops)
        except Oops as exc:
            print("caught", type(exc).__name__, isinstance(exc, zfabric.TaskError))


if __name__ == "__main__":
    asyncio.run(amain())
    with zfabric.Executor(1) as ex:
        print("executor", list(ex.map(double, [1, 2, 3])))
