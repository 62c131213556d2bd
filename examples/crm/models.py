"""The CRM models (SQLAlchemy 2.x typed declarative).

::

    Company ──< Contact ──< Conversation
       │  │        └──────< Enrollment >── Cadence >── Company
       │  └──< AutomationRule
       └── CompanySettings (one-to-one, optional)

Every foreign key is ``NOT NULL`` except where noted, so :func:`parallelkit.sqlalchemy.eager`
loads the many-to-one side with an inner join. The tables carry no schema name: the
tests put each run in its own PostgreSQL schema through ``search_path``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AutomationRule",
    "Base",
    "Cadence",
    "Company",
    "CompanySettings",
    "Contact",
    "Conversation",
    "Enrollment",
]


class Base(DeclarativeBase):
    """Declarative base of the CRM schema (``Base.metadata.create_all`` builds it)."""


class Company(Base):
    """A customer account: owns contacts, automation rules and cadences."""

    __tablename__ = "companies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    domain: Mapped[str] = mapped_column(String(200), unique=True)
    plan: Mapped[str] = mapped_column(String(20), default="free")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_activity_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    contacts: Mapped[list[Contact]] = relationship(back_populates="company")
    automation_rules: Mapped[list[AutomationRule]] = relationship(
        back_populates="company", order_by="AutomationRule.id"
    )
    cadences: Mapped[list[Cadence]] = relationship(back_populates="company")
    settings: Mapped[CompanySettings | None] = relationship(back_populates="company")

    def __repr__(self) -> str:
        return f"Company(id={self.id!r}, name={self.name!r})"


class CompanySettings(Base):
    """Optional per-company settings: the one-to-one example (a company may have none)."""

    __tablename__ = "company_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id"), unique=True)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    webhook_url: Mapped[str | None] = mapped_column(String(500))

    company: Mapped[Company] = relationship(back_populates="settings")


class Contact(Base):
    """A person at a company."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id"), index=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_contacted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    company: Mapped[Company] = relationship(back_populates="contacts")
    conversations: Mapped[list[Conversation]] = relationship(back_populates="contact")
    enrollments: Mapped[list[Enrollment]] = relationship(back_populates="contact")

    def __repr__(self) -> str:
        return f"Contact(id={self.id!r}, email={self.email!r})"


class Conversation(Base):
    """A support/sales thread with a contact (what the playbook's webhook loads)."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="open")
    channel: Mapped[str] = mapped_column(String(20), default="email")
    subject: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    contact: Mapped[Contact] = relationship(back_populates="conversations")

    def __repr__(self) -> str:
        return f"Conversation(id={self.id!r}, status={self.status!r})"


class AutomationRule(Base):
    """What to do when something happens in a company's conversations."""

    __tablename__ = "automation_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id"), index=True)
    trigger: Mapped[str] = mapped_column(String(50))
    action: Mapped[str] = mapped_column(String(50))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)

    company: Mapped[Company] = relationship(back_populates="automation_rules")

    def __repr__(self) -> str:
        return f"AutomationRule(id={self.id!r}, trigger={self.trigger!r})"


class Cadence(Base):
    """A timed follow-up sequence, e.g. "re-engage after 21 inactive days"."""

    __tablename__ = "cadences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    inactive_days: Mapped[int] = mapped_column(Integer, default=21)

    company: Mapped[Company] = relationship(back_populates="cadences")
    enrollments: Mapped[list[Enrollment]] = relationship(back_populates="cadence")


class Enrollment(Base):
    """A contact enrolled in a cadence."""

    __tablename__ = "enrollments"
    __table_args__ = (UniqueConstraint("contact_id", "cadence_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), index=True)
    cadence_id: Mapped[int] = mapped_column(ForeignKey("cadences.id"), index=True)
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    contact: Mapped[Contact] = relationship(back_populates="enrollments")
    cadence: Mapped[Cadence] = relationship(back_populates="enrollments")
