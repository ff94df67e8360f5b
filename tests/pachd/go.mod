// The project's own wrapper module for Pachyderm's testpachd (real pachd for `make test-pachd`):
// `go build github.com/pachyderm/pachyderm/v2/src/testing/testpachd` from this directory builds
// that command at the version pinned here, the one pachyderm-sdk 2.12.2 speaks to.
module kafkaspout.test/pachd

go 1.23.1

require github.com/pachyderm/pachyderm/v2 v2.12.2

// Pachyderm v2.12.2's own replace: its dex fork. The fork has no checksum-database entry, so
// go.sum here is seeded from pachyderm v2.12.2's own go.sum.
replace github.com/dexidp/dex => github.com/pachyderm/dex v0.0.0-20250103170744-292f1ae604a3
