/*
 * mvrefresh_capture: lets a capture trigger skip a row before any PL/pgSQL runs.
 *
 * A capture trigger marks a key dirty once per dirty period; after that, every row of that key
 * a session writes has nothing to do. Without this extension the trigger function itself finds
 * that out (its session remembers the keys it marked, in settings), which costs a PL/pgSQL call
 * on every row. With it, the capture's row trigger is native_capture(capture function, key
 * column), a C function that answers from this backend's memory of the keys the capture
 * function marked, and calls that function only for a row with a key it does not remember.
 *
 * What is remembered and when it is forgotten:
 *  - native_keep(capture function, key, epoch) records a key; only the capture functions (run
 *    as mvrefresh's installing role) may call it, after finding or writing the key's row in
 *    mvrefresh.dirty, with the epoch native_epoch() gave them before they looked. Writers cannot
 *    write this memory, so they cannot hide a change.
 *  - Keys are compared as the binary image of the typed value, per capture (the capture
 *    function's OID).
 *  - Whenever rows leave mvrefresh.dirty (the daemon's collect deletes what it takes), a trigger
 *    on it (native_dirty_changed) invalidates the relation cache entry of the sequence
 *    mvrefresh.generation at commit; `mvrefresh install` does the same (native_forget). Every
 *    backend drops its memory when it processes that invalidation, which it does whenever it
 *    takes a lock it did not hold yet in its transaction: at the latest when a statement first
 *    locks the captured table. A transaction that held that lock before the collect committed
 *    is one the daemon's hand-over guard waits for (it lists the holders of that lock after the
 *    commit); any other processes the invalidation before its first row. A key kept after the
 *    memory was dropped since the capture function read its epoch is not kept: the dirty row it
 *    saw may be gone.
 *  - An aborted transaction or subtransaction, or a prepared one, drops everything (the dirty row
 *    written with it may be gone). Forgetting is always safe: the next row takes the function.
 *  - Bounded: at most MAX_ENTRIES keys and MAX_BYTES of them; past that the memory starts over.
 *
 * Version 1.0's functions (native_unseen_<slot> in the triggers' WHEN, native_remember, the
 * memory checked against the generation's value at every statement) are kept for databases not
 * yet installed again after the update: see the end of this file.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/tuptable.h"
#include "pgstat.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/datum.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"
#include "utils/syscache.h"

PG_MODULE_MAGIC;

#define TABLE_SLOTS 1024		/* a power of two, twice MAX_ENTRIES */
#define MAX_ENTRIES 512
#define MAX_BYTES (64 * 1024)
#define MAX_KEY_BYTES 1024		/* longer keys always take the trigger */

typedef struct Entry
{
	uint32		hash;
	uint32		len;
	char	   *bytes;			/* capture OID, then the key's image; NULL: empty */
} Entry;

/* Per call site (fn_extra): the key's type, and whether this statement checked the generation. */
typedef struct KeyType
{
	Oid			type;
	int16		typlen;
	bool		typbyval;
	bool		checked;
} KeyType;

static Entry table[TABLE_SLOTS];
static int	entries = 0;
static Size bytes = 0;
static MemoryContext keys_cxt = NULL;
static uint64 epoch = 1;		/* moves on whenever the memory is dropped */

/* Version 1.0: the memory belongs to generation `generation`. */
static bool valid = false;
static int64 generation = 0;

/*
 * mvrefresh.generation and its owner, looked up once, forgotten on an invalidation of it, which
 * also drops the memory. (Nothing is kept while it is unknown.)
 */
static Oid	generation_seq = InvalidOid;
static Oid	generation_owner = InvalidOid;

void		_PG_init(void);

static void
forget(void)
{
	if (keys_cxt != NULL)
		MemoryContextReset(keys_cxt);
	memset(table, 0, sizeof(table));
	entries = 0;
	bytes = 0;
	valid = false;
	epoch++;
}

static void
xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		forget();
}

static void
subxact_callback(SubXactEvent event, SubTransactionId mySubid,
				 SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		forget();
}

/* Captures as their triggers name them (see native_capture); see the callbacks. */
typedef struct Capture
{
	Oid			trigger;
	Oid			relid;			/* the captured table */
	Oid			func;			/* the capture function: the capture's identity */
	AttrNumber	attno;			/* the key's column */
	KeyType		kt;
} Capture;

#define MAX_CAPTURES 64
static Capture captures[MAX_CAPTURES];
static int	ncaptures = 0;

static void
relcache_callback(Datum arg, Oid relid)
{
	int			i,
				kept = 0;

	if (relid == InvalidOid || relid == generation_seq)
	{
		forget();
		generation_seq = InvalidOid;
	}
	for (i = 0; i < ncaptures; i++)
		if (relid != InvalidOid && captures[i].relid != relid)
			captures[kept++] = captures[i];
	ncaptures = kept;
}

/* A function changed: its name may now stand for another one. */
static void
proc_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	ncaptures = 0;
}

void
_PG_init(void)
{
	RegisterXactCallback(xact_callback, NULL);
	RegisterSubXactCallback(subxact_callback, NULL);
	CacheRegisterRelcacheCallback(relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, proc_callback, (Datum) 0);
}

/*
 * The current generation, read as the sequence's owner (writers have no right to read it).
 * False when there is none to read.
 */
static bool
watched(void)
{
	if (!OidIsValid(generation_seq))
	{
		Oid			nsp = get_namespace_oid("mvrefresh", true);
		Oid			seq;
		HeapTuple	tuple;
		Form_pg_class form;

		if (!OidIsValid(nsp))
			return false;
		seq = get_relname_relid("generation", nsp);
		if (!OidIsValid(seq))
			return false;
		tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(seq));
		if (!HeapTupleIsValid(tuple))
			return false;
		form = (Form_pg_class) GETSTRUCT(tuple);
		if (form->relkind != RELKIND_SEQUENCE)
		{
			ReleaseSysCache(tuple);
			return false;
		}
		generation_owner = form->relowner;
		ReleaseSysCache(tuple);
		generation_seq = seq;
	}
	return true;
}

static bool
read_generation(int64 *out)
{
	Oid			save_userid;
	int			save_sec_context;
	Datum		value = (Datum) 0;
	bool		isnull = true;

	if (!watched())
		return false;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(generation_owner,
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		LOCAL_FCINFO(fcinfo, 1);

		InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = ObjectIdGetDatum(generation_seq);
		fcinfo->args[0].isnull = false;
		value = pg_sequence_last_value(fcinfo);
		isnull = fcinfo->isnull;
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec_context);
	}
	PG_END_TRY();
	if (isnull)
		return false;
	*out = DatumGetInt64(value);
	return true;
}

/* Drops the memory if the generation moved on. */
static void
check_generation(void)
{
	int64		current;

	if (!read_generation(&current))
		forget();
	else if (!valid || current != generation)
	{
		forget();
		generation = current;
		valid = true;
	}
}

static KeyType *
key_type(FunctionCallInfo fcinfo, int argno)
{
	KeyType    *kt = (KeyType *) fcinfo->flinfo->fn_extra;
	Oid			type = get_fn_expr_argtype(fcinfo->flinfo, argno);

	if (kt == NULL)
	{
		kt = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(KeyType));
		fcinfo->flinfo->fn_extra = kt;
	}
	if (kt->type != type || !OidIsValid(type))
	{
		if (!OidIsValid(type))
			elog(ERROR, "mvrefresh_capture: cannot tell the type of a key");
		get_typlenbyval(type, &kt->typlen, &kt->typbyval);
		kt->type = type;
	}
	return kt;
}

/*
 * The key's entry: the capture's OID then the value's binary image, in buf. False when the
 * value has no image worth remembering (too long, compressed or out of line).
 */
static bool
key_image(Oid capture, Datum value, KeyType *kt, char *buf, uint32 *len)
{
	const char *data;
	Size		size;

	if (kt->typbyval)
	{
		data = (const char *) &value;
		size = sizeof(Datum);
	}
	else if (kt->typlen == -1)
	{
		struct varlena *v = (struct varlena *) DatumGetPointer(value);

		if (VARATT_IS_EXTERNAL(v) || VARATT_IS_COMPRESSED(v))
			return false;
		data = VARDATA_ANY(v);
		size = VARSIZE_ANY_EXHDR(v);
	}
	else if (kt->typlen > 0)
	{
		data = DatumGetPointer(value);
		size = kt->typlen;
	}
	else
		return false;
	if (size > MAX_KEY_BYTES)
		return false;
	memcpy(buf, &capture, sizeof(Oid));
	memcpy(buf + sizeof(Oid), data, size);
	*len = sizeof(Oid) + size;
	return true;
}

/* The slot holding the entry, or -1 - the empty slot where it would go. */
static int
lookup(const char *key, uint32 len, uint32 hash)
{
	int			i = hash & (TABLE_SLOTS - 1);

	for (;;)
	{
		Entry	   *e = &table[i];

		if (e->bytes == NULL)
			return -1 - i;
		if (e->hash == hash && e->len == len && memcmp(e->bytes, key, len) == 0)
			return i;
		i = (i + 1) & (TABLE_SLOTS - 1);
	}
}

static bool
remembered(Oid capture, Datum value, KeyType *kt)
{
	char		buf[sizeof(Oid) + MAX_KEY_BYTES];
	uint32		len;

	if (!key_image(capture, value, kt, buf, &len))
		return false;
	return lookup(buf, len, hash_bytes((const unsigned char *) buf, len)) >= 0;
}

/* Adds the entry (a capture's OID and a key's image) unless it is there. */
static void
insert(const char *buf, uint32 len)
{
	uint32		hash = hash_bytes((const unsigned char *) buf, len);
	int			at = lookup(buf, len, hash);
	Entry	   *e;

	if (at >= 0)
		return;
	if (keys_cxt == NULL)
		keys_cxt = AllocSetContextCreate(TopMemoryContext, "mvrefresh_capture keys",
										 ALLOCSET_SMALL_SIZES);
	e = &table[-1 - at];
	e->bytes = MemoryContextAlloc(keys_cxt, len);
	memcpy(e->bytes, buf, len);
	e->len = len;
	e->hash = hash;
	entries++;
	bytes += len;
}

/*
 * Version 1.0, kept for triggers not yet replaced by `mvrefresh install`.
 *
 * native_unseen_<slot>(new key, old key): true when the trigger must run, i.e. a non-NULL key
 * of the row is not remembered as dirty under the current generation. (A NULL key marks
 * nothing.) INSERT and DELETE triggers pass their one key twice.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_unseen);
Datum
mvrefresh_native_unseen(PG_FUNCTION_ARGS)
{
	Oid			capture = fcinfo->flinfo->fn_oid;
	KeyType    *kt = key_type(fcinfo, 0);

	if (!kt->checked)
	{
		check_generation();
		kt->checked = true;
	}
	if (!valid || entries == 0)
		PG_RETURN_BOOL(true);
	if (!PG_ARGISNULL(0) && !remembered(capture, PG_GETARG_DATUM(0), kt))
		PG_RETURN_BOOL(true);
	if (!PG_ARGISNULL(1) &&
		(PG_ARGISNULL(0) ||
		 !datum_image_eq(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1), kt->typbyval, kt->typlen)) &&
		!remembered(capture, PG_GETARG_DATUM(1), kt))
		PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(false);
}

/*
 * Version 1.0. native_remember(unseen function, key, generation): the trigger found or wrote
 * the key's row in mvrefresh.dirty, having read `generation` before it looked. Kept only while
 * the generation stays that one.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_remember);
Datum
mvrefresh_native_remember(PG_FUNCTION_ARGS)
{
	Oid			capture;
	int64		read;
	KeyType    *kt;
	char		buf[sizeof(Oid) + MAX_KEY_BYTES];
	uint32		len;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();
	capture = PG_GETARG_OID(0);
	read = PG_GETARG_INT64(2);
	kt = key_type(fcinfo, 1);
	if (!key_image(capture, PG_GETARG_DATUM(1), kt, buf, &len))
		PG_RETURN_VOID();
	/* Another generation's memory, or a full one: start over. */
	if (!valid || read != generation || entries >= MAX_ENTRIES || bytes + len > MAX_BYTES)
	{
		forget();
		generation = read;
		valid = true;
	}
	insert(buf, len);
	PG_RETURN_VOID();
}

/*
 * Version 1.1.
 *
 * native_epoch(): the memory's epoch, read by a capture function before it looks a key up.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_epoch);
Datum
mvrefresh_native_epoch(PG_FUNCTION_ARGS)
{
	/*
	 * The sequence first: an invalidation of it is noticed only once it is known, and one taken
	 * in after this epoch was read must move it on. (Unknown, the memory is empty.)
	 */
	(void) watched();
	PG_RETURN_INT64((int64) epoch);
}

/*
 * native_keep(capture function, key, epoch): the capture function found or wrote the key's row
 * in mvrefresh.dirty, having read `epoch` before it looked. Kept only if the memory was not
 * dropped since.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_keep);
Datum
mvrefresh_native_keep(PG_FUNCTION_ARGS)
{
	Oid			capture;
	KeyType    *kt;
	char		buf[sizeof(Oid) + MAX_KEY_BYTES];
	uint32		len;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();
	capture = PG_GETARG_OID(0);
	kt = key_type(fcinfo, 1);
	if (!key_image(capture, PG_GETARG_DATUM(1), kt, buf, &len))
		PG_RETURN_VOID();
	/* What drops the memory must be known first (looking it up may drop it). */
	if (!watched() || (uint64) PG_GETARG_INT64(2) != epoch)
		PG_RETURN_VOID();
	if (entries >= MAX_ENTRIES || bytes + len > MAX_BYTES)
		forget();				/* full: start over (the key is not kept this time) */
	else
		insert(buf, len);
	PG_RETURN_VOID();
}

/*
 * The function a native_capture trigger names must be a capture function: a trigger function in
 * schema mvrefresh owned by that schema's owner (whoever may create such a trigger is that
 * owner or a superuser, and may run that function as a trigger anyway). Anything else, e.g. a
 * function its creator may not execute, or one that is not a trigger function, is refused.
 */
static void
check_capture_function(Trigger *tg, Oid func)
{
	HeapTuple	proc = SearchSysCache1(PROCOID, ObjectIdGetDatum(func));
	HeapTuple	nsp;
	Form_pg_proc p;
	bool		ok;

	if (!HeapTupleIsValid(proc))
		elog(ERROR, "cache lookup failed for function %u", func);
	p = (Form_pg_proc) GETSTRUCT(proc);
	nsp = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(p->pronamespace));
	ok = HeapTupleIsValid(nsp) &&
		strcmp(NameStr(((Form_pg_namespace) GETSTRUCT(nsp))->nspname), "mvrefresh") == 0 &&
		((Form_pg_namespace) GETSTRUCT(nsp))->nspowner == p->proowner &&
		p->prorettype == TRIGGEROID && p->pronargs == 0 &&
		strncmp(NameStr(p->proname), "capture_", strlen("capture_")) == 0;
	if (HeapTupleIsValid(nsp))
		ReleaseSysCache(nsp);
	ReleaseSysCache(proc);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("mvrefresh_capture: trigger \"%s\" names %s, which is not a capture function",
						tg->tgname, tg->tgargs[0]),
				 errdetail("A capture function is a trigger function named capture_* in schema mvrefresh, owned by that schema's owner.")));
}

/* The capture a native_capture trigger stands for (its arguments resolved once, cached). */
static Capture *
capture_of(TriggerData *td)
{
	Trigger    *tg = td->tg_trigger;
	TupleDesc	desc = RelationGetDescr(td->tg_relation);
	Capture		c;
	Oid			func;
	int			i;

	for (i = 0; i < ncaptures; i++)
		if (captures[i].trigger == tg->tgoid)
			return &captures[i];
	if (tg->tgnargs != 2)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mvrefresh_capture: trigger \"%s\" must name (capture function, key column)",
						tg->tgname)));
	/* May process invalidations, and so change the cache. */
	func = DatumGetObjectId(DirectFunctionCall1(regprocedurein, CStringGetDatum(tg->tgargs[0])));
	check_capture_function(tg, func);
	memset(&c, 0, sizeof(c));
	c.trigger = tg->tgoid;
	c.relid = RelationGetRelid(td->tg_relation);
	c.func = func;
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(desc, i);

		if (!a->attisdropped && strcmp(NameStr(a->attname), tg->tgargs[1]) == 0)
		{
			c.attno = a->attnum;
			c.kt.type = a->atttypid;
			c.kt.typlen = a->attlen;
			c.kt.typbyval = a->attbyval;
			break;
		}
	}
	if (c.attno == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("mvrefresh_capture: trigger \"%s\": table \"%s\" has no column \"%s\"",
						tg->tgname, RelationGetRelationName(td->tg_relation), tg->tgargs[1])));
	if (ncaptures == MAX_CAPTURES)
		ncaptures = 0;
	captures[ncaptures] = c;
	return &captures[ncaptures++];
}

/* Per trigger and statement (fn_extra): the capture, and its function ready to call. */
typedef struct CaptureCall
{
	Capture		c;
	FmgrInfo	flinfo;
} CaptureCall;

/*
 * native_capture(capture function, key column): the row trigger (AFTER INSERT, UPDATE, DELETE)
 * of a capture. Calls the capture function with the trigger's data unless every non-NULL key
 * of the row (the new and the old one) is remembered.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_capture);
Datum
mvrefresh_native_capture(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	CaptureCall *call = (CaptureCall *) fcinfo->flinfo->fn_extra;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) || TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mvrefresh_capture: native_capture must be an AFTER row trigger")));
	if (call == NULL)
	{
		call = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(CaptureCall));
		call->c = *capture_of(td);
		fmgr_info_cxt(call->c.func, &call->flinfo, fcinfo->flinfo->fn_mcxt);
		fcinfo->flinfo->fn_extra = call;
	}
	if (entries > 0)
	{
		Datum		first,
					second;
		bool		first_null,
					second_null;

		/* INSERT: the new row; UPDATE, DELETE: the old row. */
		first = slot_getattr(td->tg_trigslot, call->c.attno, &first_null);
		if (first_null || remembered(call->c.func, first, &call->c.kt))
		{
			if (!TRIGGER_FIRED_BY_UPDATE(td->tg_event))
				return PointerGetDatum(NULL);
			second = slot_getattr(td->tg_newslot, call->c.attno, &second_null);
			if (second_null ||
				(!first_null &&
				 datum_image_eq(first, second, call->c.kt.typbyval, call->c.kt.typlen)) ||
				remembered(call->c.func, second, &call->c.kt))
				return PointerGetDatum(NULL);
		}
	}
	{
		LOCAL_FCINFO(inner, 0);
		PgStat_FunctionCallUsage usage;

		InitFunctionCallInfoData(*inner, &call->flinfo, 0, InvalidOid, (Node *) td, NULL);
		pgstat_init_function_usage(inner, &usage);
		(void) FunctionCallInvoke(inner);
		pgstat_end_function_usage(&usage, true);
	}
	return PointerGetDatum(NULL);
}

/*
 * native_dirty_changed(): statement triggers on mvrefresh.dirty (AFTER DELETE and AFTER UPDATE
 * with their old rows, AFTER TRUNCATE): when rows left it, every backend drops its memory once
 * this transaction commits.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_dirty_changed);
Datum
mvrefresh_native_dirty_changed(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mvrefresh_capture: native_dirty_changed must be an AFTER statement trigger")));
	if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event) || td->tg_oldtable == NULL ||
		tuplestore_tuple_count(td->tg_oldtable) > 0)
	{
		if (!watched())
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("mvrefresh_capture: sequence mvrefresh.generation does not exist")));
		CacheInvalidateRelcacheByRelid(generation_seq);
	}
	return PointerGetDatum(NULL);
}

/* native_forget(): every backend drops its memory once this transaction commits. */
PG_FUNCTION_INFO_V1(mvrefresh_native_forget);
Datum
mvrefresh_native_forget(PG_FUNCTION_ARGS)
{
	if (!watched())
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("mvrefresh_capture: sequence mvrefresh.generation does not exist")));
	CacheInvalidateRelcacheByRelid(generation_seq);
	PG_RETURN_VOID();
}
