package hypervisor

import (
	"context"
	"errors"
	"path/filepath"

	"github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"
)

// defineSecrets gives libvirt the keys of spec's encrypted layers: one
// ephemeral (never written to disk by libvirt), private (its value cannot be
// read back) secret per layer, of usage "volume" with the layer's path.
func (c *Conn) defineSecrets(ctx context.Context, spec DomainSpec) error {
	const op = "define"
	for _, ds := range spec.Disks {
		for i, l := range ds.Chain {
			key := ds.keyOf(i)
			if len(key) == 0 {
				continue
			}
			path, err := filepath.Abs(l.Path)
			if err != nil {
				return opErr(op, spec.Name, ErrInvalidSpec, "%v", err)
			}
			sx, err := (&libvirtxml.Secret{Ephemeral: "yes", Private: "yes", UUID: SecretUUID(path),
				Description: "cvd: LUKS key of " + path,
				Usage:       &libvirtxml.SecretUsage{Type: "volume", Volume: path}}).Marshal()
			if err != nil {
				return opErr(op, spec.Name, ErrInvalidSpec, "%v", err)
			}
			err = c.do(ctx, op, spec.Name, func() error {
				s, err := c.l.SecretDefineXML(sx, 0)
				if err != nil {
					return err
				}
				return c.l.SecretSetValue(s, key, 0)
			})
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// undefineSecrets removes the secrets the undefined domain's XML named.
func (c *Conn) undefineSecrets(ctx context.Context, name, domainXML string) error {
	var d libvirtxml.Domain
	if err := d.Unmarshal(domainXML); err != nil || d.Devices == nil {
		return nil
	}
	var uuids []string
	add := func(s *libvirtxml.DomainDiskSource) {
		if s != nil && s.Encryption != nil {
			for _, sec := range s.Encryption.Secrets {
				uuids = append(uuids, sec.UUID)
			}
		}
	}
	for _, dd := range d.Devices.Disks {
		add(dd.Source)
		for bs := dd.BackingStore; bs != nil; bs = bs.BackingStore {
			add(bs.Source)
		}
	}
	var errs []error
	for _, u := range uuids {
		id, err := uuid.Parse(u)
		if err != nil {
			continue
		}
		err = c.do(ctx, "undefine", name, func() error {
			s, err := c.l.SecretLookupByUUID(libvirt.UUID(id))
			if err != nil {
				return nil // gone already (libvirtd restarted: secrets are ephemeral)
			}
			return c.l.SecretUndefine(s)
		})
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
