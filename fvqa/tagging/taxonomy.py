"""The knowledge-type taxonomy: the paper's eight level-1 types, each with a one-line definition.

The definitions are what both taggers see: the LLM reads them in its prompt, the MiniLM tagger
embeds them and compares them with the item. A config may replace them or add level-2 subtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fvqa.schema import KnowledgeType

DEFAULT_TYPES: dict[str, str] = {
    KnowledgeType.Arts: "works of art and culture: paintings, statues, music, songs, sonatas, films, books, "
    "literature, theatre, dance and artistic styles",
    KnowledgeType.Place: "places and geography: cities, countries, landmarks, towers, buildings, bridges, "
    "monuments, mountains, rivers and where things are located",
    KnowledgeType.People: "people and who a person is: artists, sculptors, painters, composers, athletes, "
    "politicians, actors, scientists and their life, job, nationality and career",
    KnowledgeType.Industry: "industry and technology: companies, brands, products, machines, vehicles, "
    "locomotives, aircraft, engines, tools and manufacturing",
    KnowledgeType.Science: "science: chemistry, physics, minerals, crystals, elements, materials, astronomy, "
    "medicine, mathematics and their measurements",
    KnowledgeType.Nature: "nature: animals, birds, insects, plants, trees, flowers, fungi, species and "
    "their habitats and biology",
    KnowledgeType.Entities: "everyday objects and artefacts: household items, lamps, lanterns, tools, food, "
    "clothing, furniture, logos and other things",
    KnowledgeType.Events: "events: festivals, celebrations, sports competitions, ceremonies, wars, "
    "elections, disasters and historical happenings",
}


@dataclass(frozen=True)
class Taxonomy:
    """Level-1 types with definitions, and optional level-2 subtypes per type."""

    types: dict[str, str]
    subtypes: dict[str, dict[str, str]] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(repr(sorted(self.types.items())) + repr(sorted((k, sorted(v.items()))
                                                                   for k, v in self.subtypes.items())))

    def __post_init__(self) -> None:
        if not self.types:
            raise ValueError("the taxonomy needs at least one knowledge type")
        unknown = set(self.subtypes) - set(self.types)
        if unknown:
            raise ValueError(f"subtypes given for unknown knowledge types: {', '.join(sorted(unknown))}")

    @property
    def names(self) -> list[str]:
        return list(self.types)

    def describe(self) -> str:
        """The taxonomy as prompt text: one line per type (and indented subtypes)."""
        lines = []
        for name, definition in self.types.items():
            lines.append(f"- {name}: {definition}")
            for sub, sub_def in self.subtypes.get(name, {}).items():
                lines.append(f"    - {sub}: {sub_def}")
        return "\n".join(lines)


def build_taxonomy(types: dict[str, str] | None, subtypes: dict[str, dict[str, str]] | None) -> Taxonomy:
    """The configured taxonomy, defaulting to the built-in eight types."""
    return Taxonomy(dict(types or {str(k): v for k, v in DEFAULT_TYPES.items()}), dict(subtypes or {}))
