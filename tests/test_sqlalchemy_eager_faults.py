"""eager() fault paths: inheritance hierarchies, relationships that are queries, not values."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, ForeignKey, String, create_engine, select
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    Session,
    WriteOnlyMapped,
    mapped_column,
    relationship,
    selectin_polymorphic,
    selectinload,
    with_polymorphic,
)

from parallelkit.sqlalchemy import NotLoadedError, count_queries, eager


class Base(DeclarativeBase):
    pass


class Dept(Base):
    __tablename__ = "dept"
    id: Mapped[int] = mapped_column(primary_key=True)
    employees: Mapped[list[Employee]] = relationship(back_populates="dept")
    log: WriteOnlyMapped[Employee] = relationship(viewonly=True)
    history: DynamicMapped[Employee] = relationship(viewonly=True)


class Employee(Base):
    __tablename__ = "employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    dept_id: Mapped[int] = mapped_column(ForeignKey("dept.id"))
    dept: Mapped[Dept] = relationship(back_populates="employees")
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "manager"
    id: Mapped[int] = mapped_column(ForeignKey("employee.id"), primary_key=True)
    reports: Mapped[list[Report]] = relationship(back_populates="manager")
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Director(Manager):  # single-table below a joined-table subclass
    board_seat_id: Mapped[int | None] = mapped_column(ForeignKey("dept.id"), nullable=True)
    board_seat: Mapped[Dept | None] = relationship(foreign_keys=[board_seat_id])
    __mapper_args__ = {"polymorphic_identity": "director"}


class Report(Base):
    __tablename__ = "report"
    id: Mapped[int] = mapped_column(primary_key=True)
    manager_id: Mapped[int] = mapped_column(ForeignKey("manager.id"))
    manager: Mapped[Manager] = relationship(back_populates="reports")


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        dept = Dept(id=1)
        boss = Director(id=3, dept=dept, board_seat=dept)
        manager = Manager(id=1, dept=dept)
        session.add_all([dept, manager, boss, Employee(id=2, dept=dept)])
        session.add_all([Report(id=1, manager=manager), Report(id=2, manager=boss)])
        session.commit()
    yield engine
    engine.dispose()


def _employees(session: Session, *options: object) -> dict[int, Employee]:
    stmt = select(Employee).options(*options).order_by(Employee.id)  # type: ignore[arg-type]
    return {row.id: row for row in session.scalars(stmt)}


# ---------------------------------------------------------------------------- subclasses
def test_a_subclass_relationship_at_the_root_raises_instead_of_a_lazy_load(engine: Engine) -> None:
    with Session(engine) as session:
        rows = _employees(session, *eager(Employee, "dept"))
        with count_queries(engine) as counter:
            with pytest.raises(NotLoadedError) as info:
                _ = rows[1].reports  # type: ignore[attr-defined]
            with pytest.raises(NotLoadedError):  # a subclass of the subclass, its own too
                _ = rows[3].board_seat  # type: ignore[attr-defined]
            with pytest.raises(NotLoadedError):
                _ = rows[3].reports  # type: ignore[attr-defined]
        assert counter.count == 0  # no silent query per row
    error = info.value
    assert error.attribute == "Manager.reports"
    assert error.hint == "selectin_polymorphic(Employee, [Manager]), selectinload(Manager.reports)"
    assert "relationship of the subclass Manager" in str(error)
    assert "eager(Employee, 'reports'" not in str(error)  # eager cannot take that path


@pytest.mark.parametrize("user_first", [False, True])
def test_the_hinted_options_load_it_next_to_eager_in_any_order(
    engine: Engine, user_first: bool
) -> None:
    # the options the message names; they win over eager's raise, no conflict error
    mine = (selectin_polymorphic(Employee, [Manager]), selectinload(Manager.reports))
    options = (*mine, *eager(Employee, "dept")) if user_first else (*eager(Employee, "dept"), *mine)
    with Session(engine) as session:
        rows = _employees(session, *options)
        with count_queries(engine) as counter:
            assert [r.id for r in rows[1].reports] == [1]  # type: ignore[attr-defined]
            assert rows[1].dept.id == 1
            with pytest.raises(NotLoadedError):
                _ = rows[1].dept.employees
        assert counter.count == 0


def test_the_statement_is_unchanged_by_the_subclass_guards(engine: Engine) -> None:
    statements = []
    for raise_others in (True, False):
        with Session(engine) as session, count_queries(engine) as counter:
            _employees(session, *eager(Employee, "dept.employees", raise_others=raise_others))
        statements.append(counter.statements)
    assert statements[0] == statements[1]
    assert len(statements[0]) == 2


def test_a_with_polymorphic_root_names_the_options_too(engine: Engine) -> None:
    poly = with_polymorphic(Employee, [Manager])
    with Session(engine) as session:
        rows = {r.id: r for r in session.scalars(select(poly).options(*eager(poly, "dept")))}
        with pytest.raises(NotLoadedError, match=r"selectinload\(Manager.reports\)") as info:
            _ = rows[1].reports  # type: ignore[attr-defined]
    assert info.value.hint is not None


def test_a_subclass_relationship_in_a_path_is_refused_saying_why() -> None:
    with pytest.raises(ValueError, match="only its subclass Manager has it") as info:
        eager(Employee, "reports")
    assert "Employee's relationships are: dept" in str(info.value)
    eager(Report, "manager.reports")  # where the class itself has it, it is a path


# ---------------------------------------------------------------------------- not loadable
@pytest.mark.parametrize(("path", "lazy"), [("log", "write_only"), ("history", "dynamic")])
def test_write_only_and_dynamic_relationships_are_refused_at_the_door(path: str, lazy: str) -> None:
    with pytest.raises(ValueError, match=f"Dept.{path} is a lazy='{lazy}' relationship") as info:
        eager(Dept, path)
    assert "Dept's relationships are: employees" in str(info.value)  # the loadable ones


def test_write_only_and_dynamic_relationships_still_work_under_eager(engine: Engine) -> None:
    with Session(engine) as session:
        dept = session.scalars(select(Dept).options(*eager(Dept, "employees"))).one()
        assert len(session.scalars(dept.log.select()).all()) == 3
        assert dept.history.count() == 3
